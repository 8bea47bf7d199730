//! Feature definitions, written by people in TOML and checked before anything uses them: which
//! entities exist (and the request field that identifies each), and which feature views hang off
//! them (typed features with defaults, a TTL, the offline source). Everything downstream (online
//! lookups, materialisation, training sets, `/v1/predict`) works from a validated `Definitions`,
//! so it never meets an unknown entity or a default of the wrong type. A feature may be a
//! streaming aggregate: a count of events of one kind in a sliding window, kept up to date from
//! events rather than materialised (see `aggregates.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Deserialize;

use crate::FeatureStoreError;
use crate::value::{DType, FeatureValue};

/// Something features describe, e.g. a user or a show.
#[derive(Debug, Clone, PartialEq)]
pub struct Entity {
    pub name: String,
    /// The request and source column that identifies it, e.g. `user_id`.
    pub join_key: String,
    pub description: String,
}

/// One feature of a view.
#[derive(Debug, Clone, PartialEq)]
pub struct Feature {
    pub name: String,
    pub dtype: DType,
    /// Served when the store has no value (missing entity, expired, store down).
    pub default: FeatureValue,
    /// Set for a windowed event count, maintained from events.
    pub aggregate: Option<Aggregate>,
}

/// A sliding-window count of events of one kind per entity, e.g. bookings in the last hour.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    /// The event kind counted, e.g. `booking.created`.
    pub event: String,
    pub window: Duration,
}

/// Where a view's history lives, for materialisation and training sets.
#[derive(Debug, Clone, PartialEq)]
pub struct OfflineSource {
    /// Parquet file or folder on an object store (a path, file://, s3://, gs://).
    pub path: String,
    /// The column holding each row's event time.
    pub timestamp_column: String,
}

/// Features about the same entities, stored and expired together.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureView {
    pub name: String,
    /// Entity names; their join keys identify a row.
    pub entities: Vec<String>,
    pub join_keys: Vec<String>,
    /// How long a value stays valid after its event time.
    pub ttl: Duration,
    pub features: Vec<Feature>,
    pub source: Option<OfflineSource>,
}

impl FeatureView {
    pub fn feature(&self, name: &str) -> Option<(usize, &Feature)> {
        self.features
            .iter()
            .enumerate()
            .find(|(_, f)| f.name == name)
    }

    /// The streaming aggregate at a feature position, if that feature is one.
    pub fn aggregate(&self, position: usize) -> Option<&Aggregate> {
        self.features.get(position)?.aggregate.as_ref()
    }

    /// The view's streaming aggregates, with their positions among its features.
    pub fn aggregates(&self) -> impl Iterator<Item = (usize, &Aggregate)> {
        self.features
            .iter()
            .enumerate()
            .filter_map(|(i, f)| Some((i, f.aggregate.as_ref()?)))
    }
}

/// A validated set of entities and feature views.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Definitions {
    entities: BTreeMap<String, Entity>,
    views: BTreeMap<String, FeatureView>,
}

impl Definitions {
    /// Reads and validates the definitions file at `path`.
    pub fn load(path: &std::path::Path) -> Result<Self, FeatureStoreError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| FeatureStoreError::Definitions(format!("{}: {e}", path.display())))?;
        Self::from_toml(&text)
    }

    /// Parses and validates a definitions file; errors name the entity, view or feature at fault.
    pub fn from_toml(text: &str) -> Result<Self, FeatureStoreError> {
        let file: DefinitionsFile =
            toml::from_str(text).map_err(|e| FeatureStoreError::Definitions(e.to_string()))?;
        Self::validate(file).map_err(FeatureStoreError::Definitions)
    }

    pub fn entity(&self, name: &str) -> Option<&Entity> {
        self.entities.get(name)
    }

    pub fn entities(&self) -> impl Iterator<Item = &Entity> {
        self.entities.values()
    }

    pub fn view(&self, name: &str) -> Result<&FeatureView, FeatureStoreError> {
        self.views
            .get(name)
            .ok_or_else(|| FeatureStoreError::UnknownView(name.to_string()))
    }

    pub fn views(&self) -> impl Iterator<Item = &FeatureView> {
        self.views.values()
    }

    fn validate(file: DefinitionsFile) -> Result<Self, String> {
        let mut entities = BTreeMap::new();
        for entity in file.entities {
            check_name("entity", &entity.name)?;
            let join_key = entity
                .join_key
                .unwrap_or_else(|| format!("{}_id", entity.name));
            check_name(&format!("entity '{}': join_key", entity.name), &join_key)?;
            let name = entity.name.clone();
            let previous = entities.insert(
                name.clone(),
                Entity {
                    name: entity.name,
                    join_key,
                    description: entity.description,
                },
            );
            if previous.is_some() {
                return Err(format!("entity '{name}' is defined twice"));
            }
        }
        let mut views = BTreeMap::new();
        for view in file.feature_views {
            let name = view.name.clone();
            let built =
                build_view(view, &entities).map_err(|e| format!("feature view '{name}': {e}"))?;
            if views.insert(name.clone(), built).is_some() {
                return Err(format!("feature view '{name}' is defined twice"));
            }
        }
        Ok(Self { entities, views })
    }
}

fn build_view(view: ViewFile, entities: &BTreeMap<String, Entity>) -> Result<FeatureView, String> {
    check_name("feature view", &view.name)?;
    if view.entities.is_empty() {
        return Err("needs at least one entity".into());
    }
    let mut join_keys = Vec::new();
    for entity in &view.entities {
        let known = entities.get(entity).ok_or_else(|| {
            format!(
                "entity '{entity}' is not defined (entities: {})",
                entities.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })?;
        join_keys.push(known.join_key.clone());
    }
    let ttl = humantime::parse_duration(&view.ttl)
        .map_err(|e| format!("ttl '{}': {e} (write e.g. \"1h\", \"7d\")", view.ttl))?;
    if ttl.is_zero() {
        return Err("ttl must be longer than zero".into());
    }
    if view.features.is_empty() {
        return Err("needs at least one feature".into());
    }
    let mut seen = BTreeSet::new();
    let mut features = Vec::new();
    for feature in view.features {
        check_name("feature", &feature.name)?;
        if !seen.insert(feature.name.clone()) || join_keys.contains(&feature.name) {
            return Err(format!(
                "feature '{}' is defined twice (or is a join key)",
                feature.name
            ));
        }
        let dtype =
            DType::parse(&feature.dtype).map_err(|e| format!("feature '{}': {e}", feature.name))?;
        let default = match feature.default {
            None => dtype.zero(),
            Some(value) => FeatureValue::from_toml(dtype, &value)
                .map_err(|e| format!("feature '{}': default {value}: {e}", feature.name))?,
        };
        let aggregate = match feature.aggregate {
            None => None,
            Some(_) if dtype != DType::Int64 => {
                return Err(format!(
                    "feature '{}': an aggregate counts events, so its dtype is int64",
                    feature.name
                ));
            }
            Some(aggregate) => {
                let window = humantime::parse_duration(&aggregate.window)
                    .ok()
                    .filter(|w| !w.is_zero())
                    .ok_or_else(|| {
                        format!(
                            "feature '{}': window '{}' is not a duration (write e.g. \"1h\")",
                            feature.name, aggregate.window
                        )
                    })?;
                if aggregate.event.is_empty() {
                    return Err(format!(
                        "feature '{}': aggregate needs an event kind",
                        feature.name
                    ));
                }
                Some(Aggregate {
                    event: aggregate.event,
                    window,
                })
            }
        };
        features.push(Feature {
            name: feature.name,
            dtype,
            default,
            aggregate,
        });
    }
    let source = view.source.map(|s| OfflineSource {
        path: s.path,
        timestamp_column: s.timestamp_column,
    });
    Ok(FeatureView {
        name: view.name,
        entities: view.entities,
        join_keys,
        ttl,
        features,
        source,
    })
}

fn check_name(what: &str, name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{what} name '{name}' must be lowercase letters, digits and _, starting with a letter"
        ))
    }
}

/// The TOML file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DefinitionsFile {
    #[serde(default, rename = "entity")]
    entities: Vec<EntityFile>,
    #[serde(default, rename = "feature_view")]
    feature_views: Vec<ViewFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntityFile {
    name: String,
    join_key: Option<String>,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ViewFile {
    name: String,
    entities: Vec<String>,
    ttl: String,
    #[serde(default, rename = "feature")]
    features: Vec<FeatureFile>,
    source: Option<SourceFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeatureFile {
    name: String,
    dtype: String,
    default: Option<toml::Value>,
    aggregate: Option<AggregateFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AggregateFile {
    event: String,
    window: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceFile {
    path: String,
    timestamp_column: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
        [[entity]]
        name = "user"

        [[entity]]
        name = "show"
        join_key = "show_id"

        [[feature_view]]
        name = "user_activity"
        entities = ["user"]
        ttl = "1h"
        source = { path = "offline/user_activity.parquet", timestamp_column = "event_time" }
        feature = [
          { name = "bookings_1h", dtype = "int64" },
          { name = "avg_ticket_price", dtype = "float64", default = 12.5 },
          { name = "favourite_genre", dtype = "string", default = "drama" },
        ]

        [[feature_view]]
        name = "show_demand"
        entities = ["show"]
        ttl = "15m"
        feature = [{ name = "occupancy", dtype = "float32", default = 0 }]
    "#;

    #[test]
    fn a_definitions_file_parses_with_defaults_filled_in() {
        let definitions = Definitions::from_toml(EXAMPLE).unwrap();
        assert_eq!(definitions.entity("user").unwrap().join_key, "user_id");
        let view = definitions.view("user_activity").unwrap();
        assert_eq!(view.ttl, Duration::from_secs(3600));
        assert_eq!(view.join_keys, ["user_id"]);
        assert_eq!(view.features[0].default, FeatureValue::Int(0));
        assert_eq!(view.features[1].default, FeatureValue::Float(12.5));
        assert_eq!(view.source.as_ref().unwrap().timestamp_column, "event_time");
        let demand = definitions.view("show_demand").unwrap();
        assert_eq!(
            demand.features[0].default,
            FeatureValue::Float(0.0),
            "an integer default is accepted for a float feature"
        );
    }

    fn error(text: &str) -> String {
        Definitions::from_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn mistakes_are_named() {
        let view = |body: &str| format!("[[entity]]\nname = \"user\"\n[[feature_view]]\n{body}");
        assert!(
            error(&view(
                "name = \"v\"\nentities = [\"movie\"]\nttl = \"1h\"\nfeature = [{ name = \"x\", dtype = \"int64\" }]"
            ))
            .contains("feature view 'v': entity 'movie' is not defined (entities: user)")
        );
        assert!(
            error(&view(
                "name = \"v\"\nentities = [\"user\"]\nttl = \"soon\"\nfeature = [{ name = \"x\", dtype = \"int64\" }]"
            ))
            .contains("ttl 'soon'")
        );
        assert!(
            error(&view(
                "name = \"v\"\nentities = [\"user\"]\nttl = \"1h\"\nfeature = [{ name = \"x\", dtype = \"int64\", default = \"many\" }]"
            ))
            .contains("feature view 'v': feature 'x': default \"many\": expected an integer")
        );
        assert!(
            error(&view(
                "name = \"v\"\nentities = [\"user\"]\nttl = \"1h\"\nfeature = [{ name = \"x\", dtype = \"decimal\" }]"
            ))
            .contains("unknown dtype 'decimal'")
        );
        assert!(
            error(&view(
                "name = \"v\"\nentities = [\"user\"]\nttl = \"1h\"\nfeature = [{ name = \"x\", dtype = \"int64\" }, { name = \"x\", dtype = \"bool\" }]"
            ))
            .contains("feature 'x' is defined twice")
        );
        assert!(
            error(&view("name = \"v\"\nentities = [\"user\"]\nttl = \"1h\"\n"))
                .contains("needs at least one feature")
        );
        assert!(
            error(&view(
                "name = \"v\"\nentities = [\"user\"]\nttl = \"1h\"\nfeature = [{ name = \"x\", dtype = \"float64\", aggregate = { event = \"booking.created\", window = \"1h\" } }]"
            ))
            .contains("an aggregate counts events, so its dtype is int64")
        );
        assert!(
            error(&view(
                "name = \"v\"\nentities = [\"user\"]\nttl = \"1h\"\nfeature = [{ name = \"x\", dtype = \"int64\", aggregate = { event = \"booking.created\", window = \"0s\" } }]"
            ))
            .contains("window '0s' is not a duration")
        );
        assert!(error("[[entity]]\nname = \"User\"\n").contains("entity name 'User'"));
        assert!(
            error("[[entity]]\nname = \"user\"\n[[entity]]\nname = \"user\"\n")
                .contains("defined twice")
        );
        assert!(error("[[entities]]\nname = \"user\"\n").contains("unknown field `entities`"));
    }
}
