//! Request bodies that differ per request, for the load generators in tests/examples: `{i}` in a
//! body becomes the request's number and `{i%N}` that number modulo N, so a run can name a new
//! user every time (missing the response cache) or cycle through a known range.

/// A request body with its `{i}` and `{i%N}` places, filled in per request.
pub struct BodyTemplate {
    /// Literal text, each followed by what is written after it.
    parts: Vec<(String, Place)>,
}

/// What follows a literal part of a body.
enum Place {
    Nothing,
    /// `{i}`: the request's number.
    Number,
    /// `{i%N}`: the request's number modulo N.
    Modulo(u64),
}

impl BodyTemplate {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("{i") {
            let after = &rest[start + 2..];
            let (place, tail) = if let Some(tail) = after.strip_prefix('}') {
                (Place::Number, tail)
            } else if let Some(tail) = after.strip_prefix('%') {
                let end = tail
                    .find('}')
                    .ok_or_else(|| format!("an unclosed {{i%N}} in {text}"))?;
                let modulus: u64 =
                    tail[..end].parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                        format!("{{i%{}}}: N must be a positive number", &tail[..end])
                    })?;
                (Place::Modulo(modulus), &tail[end + 1..])
            } else {
                (Place::Nothing, after)
            };
            let literal = match place {
                Place::Nothing => &rest[..start + 2],
                _ => &rest[..start],
            };
            parts.push((literal.to_string(), place));
            rest = tail;
        }
        parts.push((rest.to_string(), Place::Nothing));
        Ok(Self { parts })
    }

    pub fn render(&self, i: u64) -> String {
        let mut out = String::new();
        for (text, place) in &self.parts {
            out.push_str(text);
            match place {
                Place::Nothing => {}
                Place::Number => out.push_str(&i.to_string()),
                Place::Modulo(modulus) => out.push_str(&(i % modulus).to_string()),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::BodyTemplate;

    #[test]
    fn places_are_filled_per_request() {
        let body =
            BodyTemplate::parse(r#"{"user": "u{i}", "slot": {i%3}, "raw": "{id}"}"#).unwrap();
        assert_eq!(
            body.render(7),
            r#"{"user": "u7", "slot": 1, "raw": "{id}"}"#
        );
        assert_eq!(
            body.render(9),
            r#"{"user": "u9", "slot": 0, "raw": "{id}"}"#
        );
    }

    #[test]
    fn bad_places_are_refused() {
        assert!(BodyTemplate::parse("{i%0}").is_err());
        assert!(BodyTemplate::parse("{i%3").is_err());
    }
}
