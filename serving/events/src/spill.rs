//! The spill folder: records the sink could not take, kept on local disk until it takes them
//! again. One file per spilled batch (JSON lines), named by a growing sequence number so replay
//! goes oldest first; a file appears whole (written aside, then renamed) and goes once its
//! records are written. The folder outlives the process: a restart replays what is left. The
//! folder has a size bound; past it, the log drops and counts instead of filling the disk. One
//! process uses a folder at a time (a lock file says so): two writers would number over each
//! other's files.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{EventError, Record};

/// One spilled batch.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Segment {
    sequence: u64,
    bytes: u64,
}

pub struct Spill {
    dir: PathBuf,
    /// Held while the folder is this process's.
    _lock: fs::File,
    max_bytes: u64,
    /// Files on disk, oldest first.
    segments: Vec<Segment>,
    next: u64,
}

/// The outcome of spilling a batch.
#[derive(Debug, PartialEq, Eq)]
pub enum Spilled {
    Kept,
    /// The folder is at its bound: the records were not kept.
    Full,
}

impl Spill {
    /// Opens (creating) the folder and takes stock of what an earlier process left.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, EventError> {
        let failed = |source| EventError::Spill {
            path: dir.to_path_buf(),
            source,
        };
        fs::create_dir_all(dir).map_err(failed)?;
        let lock = fs::File::create(dir.join(".lock")).map_err(failed)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(EventError::Config(format!(
                    "the event spill folder {} is in use by another process; give each server its own --events-dir",
                    dir.display()
                )));
            }
            Err(fs::TryLockError::Error(source)) => return Err(failed(source)),
        }
        let mut segments = Vec::new();
        for entry in fs::read_dir(dir).map_err(failed)? {
            let entry = entry.map_err(failed)?;
            let name = entry.file_name();
            let Some(sequence) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".jsonl"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let bytes = entry.metadata().map_err(failed)?.len();
            segments.push(Segment { sequence, bytes });
        }
        segments.sort();
        let next = segments.last().map_or(0, |s| s.sequence + 1);
        Ok(Self {
            dir: dir.to_path_buf(),
            _lock: lock,
            max_bytes,
            segments,
            next,
        })
    }

    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    fn path(&self, sequence: u64) -> PathBuf {
        self.dir.join(format!("{sequence:016}.jsonl"))
    }

    /// Keeps records as a new segment, unless that would pass the folder's bound.
    pub fn keep(&mut self, records: &[Record]) -> Result<Spilled, EventError> {
        let mut text = Vec::new();
        for record in records {
            serde_json::to_writer(&mut text, record).expect("records encode as JSON");
            text.push(b'\n');
        }
        if self.bytes() + text.len() as u64 > self.max_bytes {
            return Ok(Spilled::Full);
        }
        let sequence = self.next;
        self.write(sequence, &text)?;
        self.next += 1;
        self.segments.push(Segment {
            sequence,
            bytes: text.len() as u64,
        });
        Ok(Spilled::Kept)
    }

    fn write(&self, sequence: u64, text: &[u8]) -> Result<(), EventError> {
        let path = self.path(sequence);
        let aside = path.with_extension("partial");
        let failed = |source| EventError::Spill {
            path: path.clone(),
            source,
        };
        let mut file = fs::File::create(&aside).map_err(failed)?;
        file.write_all(text).map_err(failed)?;
        file.sync_data().map_err(failed)?;
        fs::rename(&aside, &path).map_err(failed)
    }

    /// The oldest segment and its records. Lines that do not parse (a damaged file) are counted
    /// in the third value and left out, and the file is rewritten without them, so they are
    /// counted once.
    pub fn oldest(&mut self) -> Result<Option<(Segment, Vec<Record>, usize)>, EventError> {
        let Some(segment) = self.segments.first().cloned() else {
            return Ok(None);
        };
        let path = self.path(segment.sequence);
        let bytes = fs::read(&path).map_err(|source| EventError::Spill {
            path: path.clone(),
            source,
        })?;
        let mut records = Vec::new();
        let mut damaged = 0;
        for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            match serde_json::from_slice(line) {
                Ok(record) => records.push(record),
                Err(_) => damaged += 1,
            }
        }
        if damaged > 0 {
            self.narrow(&segment, &records)?;
        }
        Ok(Some((segment, records, damaged)))
    }

    /// The segment's records are all written: it goes.
    pub fn remove(&mut self, segment: &Segment) -> Result<(), EventError> {
        let path = self.path(segment.sequence);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(EventError::Spill { path, source }),
        }
        self.segments.retain(|s| s.sequence != segment.sequence);
        Ok(())
    }

    /// Some of the segment's records were written: it keeps only the others.
    pub fn narrow(&mut self, segment: &Segment, left: &[Record]) -> Result<(), EventError> {
        let mut text = Vec::new();
        for record in left {
            serde_json::to_writer(&mut text, record).expect("records encode as JSON");
            text.push(b'\n');
        }
        self.write(segment.sequence, &text)?;
        if let Some(kept) = self
            .segments
            .iter_mut()
            .find(|s| s.sequence == segment.sequence)
        {
            kept.bytes = text.len() as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;

    fn records(n: usize, from: usize) -> Vec<Record> {
        (from..from + n)
            .map(|i| Record::prediction("m", i as i64, Map::new()))
            .collect()
    }

    #[test]
    fn segments_replay_oldest_first_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = Spill::open(dir.path(), u64::MAX).unwrap();
        assert_eq!(spill.keep(&records(3, 0)).unwrap(), Spilled::Kept);
        assert_eq!(spill.keep(&records(2, 3)).unwrap(), Spilled::Kept);
        drop(spill);

        let mut spill = Spill::open(dir.path(), u64::MAX).unwrap();
        let (first, read, damaged) = spill.oldest().unwrap().unwrap();
        assert_eq!((read, damaged), (records(3, 0), 0));
        spill.narrow(&first, &records(1, 2)).unwrap();
        assert_eq!(spill.oldest().unwrap().unwrap().1, records(1, 2));
        spill.remove(&first).unwrap();
        let (second, read, _) = spill.oldest().unwrap().unwrap();
        assert_eq!(read, records(2, 3));
        spill.remove(&second).unwrap();
        assert!(spill.bytes() == 0 && spill.oldest().unwrap().is_none());
        assert_eq!(spill.keep(&records(1, 9)).unwrap(), Spilled::Kept);
        assert!(
            dir.path().join(format!("{:016}.jsonl", 2)).exists(),
            "numbering goes on after the last file"
        );
    }

    #[test]
    fn the_bound_refuses_instead_of_filling_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = Spill::open(dir.path(), 200).unwrap();
        assert_eq!(spill.keep(&records(1, 0)).unwrap(), Spilled::Kept);
        assert_eq!(spill.keep(&records(100, 1)).unwrap(), Spilled::Full);
        assert!(spill.bytes() <= 200);
    }

    #[test]
    fn damaged_lines_are_counted_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = Spill::open(dir.path(), u64::MAX).unwrap();
        spill.keep(&records(2, 0)).unwrap();
        let path = dir.path().join(format!("{:016}.jsonl", 0));
        let mut bytes = fs::read(&path).unwrap();
        bytes.extend_from_slice(b"{not json\n\xff\xfe not even text\n");
        fs::write(&path, bytes).unwrap();
        let (_, read, damaged) = spill.oldest().unwrap().unwrap();
        assert_eq!((read.len(), damaged), (2, 2));
        let (_, read, damaged) = spill.oldest().unwrap().unwrap();
        assert_eq!(
            (read.len(), damaged),
            (2, 0),
            "damaged lines are counted once"
        );
    }

    #[test]
    fn one_process_at_a_time_uses_a_folder() {
        let dir = tempfile::tempdir().unwrap();
        let spill = Spill::open(dir.path(), u64::MAX).unwrap();
        let Err(EventError::Config(message)) = Spill::open(dir.path(), u64::MAX) else {
            panic!("a second spill on the same folder must be refused");
        };
        assert!(message.contains("--events-dir"), "{message}");
        drop(spill);
        assert!(Spill::open(dir.path(), u64::MAX).is_ok());
    }
}
