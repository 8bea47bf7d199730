//! Arithmetic a pipeline declares as text (`candidates * base_price`, `clamp(price, lowest,
//! highest)`): what a pricing pipeline's revenue, constraints and rule-table fallback are written
//! in, so a business rule is a declaration beside the model, not code in the server. Parsed by
//! evalexpr when the version loads and checked then (the names it reads, the functions it calls,
//! one trial evaluation), so a request never meets an expression that cannot run. Every number is
//! a decimal (`7 / 2` is 3.5, not 3) and a comparison that is the whole result reads 1 or 0.
//!
//! evalexpr is pinned to 11: later releases are AGPL-licensed, which this Apache-2.0 server
//! cannot take.

use evalexpr::{Context, EvalexprError, EvalexprResult, Node, Operator, Value};

/// The functions an expression may call: evalexpr's numeric builtins, and `clamp`.
const FUNCTIONS: [&str; 11] = [
    "min",
    "max",
    "clamp",
    "if",
    "floor",
    "round",
    "ceil",
    "math::abs",
    "math::sqrt",
    "math::ln",
    "math::exp",
];

/// A checked expression over named numbers.
#[derive(Debug, Clone)]
pub struct Expression {
    text: String,
    tree: Node,
    /// The names it reads, each once, in order of first use.
    names: Vec<String>,
}

impl Expression {
    pub fn parse(text: &str) -> Result<Self, String> {
        let at = |e: String| format!("expression '{text}': {e}");
        let mut tree = evalexpr::build_operator_tree(text).map_err(|e| at(e.to_string()))?;
        decimals(&mut tree).map_err(at)?;
        if let Some(unknown) = tree
            .iter_function_identifiers()
            .find(|f| !FUNCTIONS.contains(f))
        {
            return Err(at(format!(
                "'{unknown}' is not a function it may call ({})",
                FUNCTIONS.join(", ")
            )));
        }
        let mut names: Vec<String> = Vec::new();
        for name in tree.iter_read_variable_identifiers() {
            if !names.iter().any(|n| n == name) {
                names.push(name.to_string());
            }
        }
        let expression = Self {
            text: text.to_string(),
            tree,
            names,
        };
        // A wrong argument count or a truth value where a number belongs shows on any input.
        expression
            .eval(&vec![1.0; expression.names.len()])
            .map_err(at)?;
        Ok(expression)
    }

    /// The names the expression reads, in the order [`Expression::eval`] takes their values.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// The value with `values[i]` for `names()[i]`.
    pub fn eval(&self, values: &[f64]) -> Result<f64, String> {
        let bound = Bound {
            names: &self.names,
            values: values.iter().map(|&v| Value::Float(v)).collect(),
        };
        match self.tree.eval_with_context(&bound) {
            Ok(Value::Float(v)) => Ok(v),
            Ok(Value::Int(v)) => Ok(v as f64),
            Ok(Value::Boolean(b)) => Ok(f64::from(u8::from(b))),
            Ok(other) => Err(format!("it gives {other}, not a number")),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Turns integer literals into decimals and refuses what is not arithmetic (assignments,
/// sequences, text).
fn decimals(node: &mut Node) -> Result<(), String> {
    match node.operator() {
        Operator::Const {
            value: Value::Int(v),
        } => {
            let v = *v as f64;
            *node.operator_mut() = Operator::Const {
                value: Value::Float(v),
            };
        }
        Operator::Const {
            value: Value::String(_),
        } => return Err("text is not a number".into()),
        Operator::Assign
        | Operator::AddAssign
        | Operator::SubAssign
        | Operator::MulAssign
        | Operator::DivAssign
        | Operator::ModAssign
        | Operator::ExpAssign
        | Operator::AndAssign
        | Operator::OrAssign
        | Operator::VariableIdentifierWrite { .. } => {
            return Err("it may not assign".into());
        }
        Operator::Chain => return Err("it is one expression, without ';'".into()),
        _ => {}
    }
    node.children_mut().iter_mut().try_for_each(decimals)
}

/// The values of one evaluation.
struct Bound<'a> {
    names: &'a [String],
    values: Vec<Value>,
}

impl Context for Bound<'_> {
    fn get_value(&self, identifier: &str) -> Option<&Value> {
        self.names
            .iter()
            .position(|n| n == identifier)
            .map(|i| &self.values[i])
    }

    fn call_function(&self, identifier: &str, argument: &Value) -> EvalexprResult<Value> {
        if identifier != "clamp" {
            return Err(EvalexprError::FunctionIdentifierNotFound(
                identifier.to_string(),
            ));
        }
        let arguments = argument.as_fixed_len_tuple(3)?;
        let x = arguments[0].as_number()?;
        let (low, high) = (arguments[1].as_number()?, arguments[2].as_number()?);
        // The upper bound wins where the bounds cross, as min(max(x, low), high) does.
        Ok(Value::Float(x.max(low).min(high)))
    }

    fn are_builtin_functions_disabled(&self) -> bool {
        false
    }

    fn set_builtin_functions_disabled(&mut self, _: bool) -> EvalexprResult<()> {
        Err(EvalexprError::ContextNotMutable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_decimals_and_names_are_read_in_order() {
        let e = Expression::parse("b * 7 / 2 + a - b").unwrap();
        assert_eq!(e.names(), ["b", "a"]);
        assert_eq!(e.eval(&[2.0, 1.0]).unwrap(), 6.0);
        assert_eq!(Expression::parse("7 / 2").unwrap().eval(&[]).unwrap(), 3.5);
    }

    #[test]
    fn rules_read_as_arithmetic() {
        let rule = Expression::parse(
            "base * if(hour >= 18 && hour < 22, 1.2, 1.0) * if(weekday >= 5, 1.15, 1.0)",
        )
        .unwrap();
        assert_eq!(rule.names(), ["base", "hour", "weekday"]);
        let price = |hour, weekday| rule.eval(&[10.0, hour, weekday]).unwrap();
        assert!((price(19.5, 6.0) - 13.8).abs() < 1e-9);
        assert!((price(22.0, 1.0) - 10.0).abs() < 1e-9);
        assert_eq!(
            Expression::parse("x > 2").unwrap().eval(&[3.0]).unwrap(),
            1.0
        );
    }

    #[test]
    fn clamp_keeps_within_bounds_and_the_upper_wins_a_crossing() {
        let e = Expression::parse("clamp(x, lo, hi)").unwrap();
        assert_eq!(e.eval(&[5.0, 1.0, 3.0]).unwrap(), 3.0);
        assert_eq!(e.eval(&[-5.0, 1.0, 3.0]).unwrap(), 1.0);
        assert_eq!(e.eval(&[2.0, 4.0, 3.0]).unwrap(), 3.0);
    }

    #[test]
    fn what_is_not_arithmetic_is_refused_at_parse() {
        for (text, says) in [
            ("x = 2", "may not assign"),
            ("x; 2", "without ';'"),
            ("str::trim(x)", "not a function it may call"),
            ("\"a\" + x", "text"),
            ("clamp(x, 1)", "expression 'clamp(x, 1)'"),
            ("if(x, 1, 2)", "expression 'if(x, 1, 2)'"),
            ("x +", "expression 'x +'"),
        ] {
            let error = Expression::parse(text).unwrap_err();
            assert!(error.contains(says), "{text}: {error}");
        }
    }
}
