//! A model's references (aliases, stages, archived versions) as a log of revisions:
//! `{root}/{model}/refs/{revision}.json`, each holding the whole state after one change and the
//! change itself (who, when, why).
//!
//! A change reads the latest revision and creates the next one with a create-only put; if another
//! writer created it first, the put fails and the change is reported as a conflict, so no update is
//! ever lost. Create-only puts work on every store (S3 `If-None-Match: *`, GCS generation 0, local
//! files by hard link), unlike ETag-conditional overwrites, which the local store lacks. The log is
//! also the history, and a poller lists only the revisions after the last one it saw.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// The refs schema this code writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// Width of the zero-padded revision number in object names, so names sort as numbers.
const REVISION_DIGITS: usize = 12;

/// Where a version is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Dev,
    Staging,
    Production,
}

impl Stage {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "dev" => Ok(Stage::Dev),
            "staging" => Ok(Stage::Staging),
            "production" => Ok(Stage::Production),
            other => Err(format!(
                "unknown stage '{other}': use dev, staging or production"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Stage::Dev => "dev",
            Stage::Staging => "staging",
            Stage::Production => "production",
        }
    }
}

/// A version's stage and who approved it there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageRecord {
    pub stage: Stage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<String>,
    pub at: String,
}

/// What a revision changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub at: String,
    pub by: String,
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// The version the alias pointed at before, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<u64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    AliasSet,
    AliasRemove,
    Promote,
    Archive,
    /// Production back to a version that held it before, without a new approval.
    Rollback,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::AliasSet => "alias set",
            Action::AliasRemove => "alias rm",
            Action::Promote => "promote",
            Action::Archive => "archive",
            Action::Rollback => "rollback",
        }
    }
}

/// A model's references after `revision` changes (revision 0: nothing set yet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refs {
    pub schema_version: u32,
    pub revision: u64,
    pub aliases: BTreeMap<String, u64>,
    /// Stage of each version that left `dev`; versions not listed are in `dev`.
    pub stages: BTreeMap<u64, StageRecord>,
    pub archived: BTreeSet<u64>,
    /// The change that produced this revision; `None` only for revision 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<Change>,
}

impl Default for Refs {
    fn default() -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            revision: 0,
            aliases: BTreeMap::new(),
            stages: BTreeMap::new(),
            archived: BTreeSet::new(),
            change: None,
        }
    }
}

impl Change {
    /// Whether two changes act on the same thing (an alias, or an archived version), so that
    /// one made without seeing the other must not be re-applied over it.
    pub fn overlaps(&self, other: &Change) -> bool {
        let same_alias = self.alias.is_some() && self.alias == other.alias;
        let archives = self.action == Action::Archive || other.action == Action::Archive;
        same_alias || (archives && self.version.is_some() && self.version == other.version)
    }
}

impl Refs {
    pub fn stage(&self, version: u64) -> Stage {
        self.stages.get(&version).map_or(Stage::Dev, |r| r.stage)
    }

    /// Aliases pointing at `version`, sorted.
    pub fn aliases_of(&self, version: u64) -> Vec<&str> {
        self.aliases
            .iter()
            .filter(|(_, v)| **v == version)
            .map(|(a, _)| a.as_str())
            .collect()
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let refs: Refs =
            serde_json::from_slice(bytes).map_err(|e| format!("invalid refs revision: {e}"))?;
        if refs.schema_version != SCHEMA_VERSION {
            return Err(format!(
                "refs schema_version {} is not supported (this build reads {SCHEMA_VERSION})",
                refs.schema_version
            ));
        }
        Ok(refs)
    }
}

/// The object name of a revision, relative to the model's `refs/` folder.
pub fn revision_file(revision: u64) -> String {
    format!("{revision:0width$}.json", width = REVISION_DIGITS)
}

/// The revision number an object name holds, if it is a revision.
pub fn parse_revision_file(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".json")?;
    (digits.len() == REVISION_DIGITS && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revision_names_sort_as_numbers_and_parse_back() {
        assert_eq!(revision_file(7), "000000000007.json");
        assert!(revision_file(9) < revision_file(10));
        assert_eq!(parse_revision_file("000000000010.json"), Some(10));
        assert_eq!(parse_revision_file("10.json"), None);
        assert_eq!(parse_revision_file("00000000001a.json"), None);
    }

    #[test]
    fn refs_round_trip_with_numeric_map_keys() {
        let mut refs = Refs::default();
        refs.aliases.insert("production".into(), 3);
        refs.stages.insert(
            3,
            StageRecord {
                stage: Stage::Production,
                approved_by: Some("ana".into()),
                at: "2026-11-23T12:00:00Z".into(),
            },
        );
        refs.archived.insert(1);
        let json = serde_json::to_vec(&refs).unwrap();
        assert_eq!(Refs::from_json(&json).unwrap(), refs);
        assert_eq!(refs.stage(3), Stage::Production);
        assert_eq!(refs.stage(2), Stage::Dev);
        assert_eq!(refs.aliases_of(3), vec!["production"]);
    }
}
