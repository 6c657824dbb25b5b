//! The write-back queue's log (`queue.log` in the queue's directory): one append-only file that
//! records what each spool holds, so that a close in write-back mode costs one `fdatasync`.
//!
//! **Records.** Each record starts on a 4 KiB block of its own (a record being written never
//! shares a block with one already durable, so a torn write cannot damage it) and is framed as
//! `S3WB`, the payload's length and its CRC32C. The payload is a JSON line (the spool's name,
//! and the queue's entry for it or `null` when the spool is gone) followed by the file's bytes
//! when the record carries them: a small file's data goes into its record, so the record's one
//! sync makes both durable, and the spool itself needs none. A larger file's spool is synced by
//! the caller before its record is written.
//!
//! **Why blocks written in advance.** The file is grown by writing zeros and syncing them in
//! steps of a few MiB; a record then overwrites blocks the file system already has, so its
//! `fdatasync` writes the data and no metadata (on ext4 about a third of the cost of an
//! `fdatasync` that grows the file, and a fifth of the three syncs a spool and an entry file of
//! their own need).
//!
//! **Reading back.** The scan takes records in order and stops at the first that is not whole
//! (zeros, a torn write or a bad CRC): everything after it was never synced, so no close that
//! returned depends on it. The last record of each spool says what it holds.
//!
//! **Compaction.** When the records no longer needed outweigh the live ones (and pass a few
//! MiB), the live records are copied into a new log, which is synced and renamed into place.
//! Every mount starts with one, so the log never outgrows what is pending by much.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// The log's file name in the queue's directory.
const QUEUE_LOG: &str = "queue.log";
const MAGIC: &[u8; 4] = b"S3WB";
const HEADER: &[u8] = b"s3mount write-back log 1\n";
const BLOCK: u64 = 4096;
/// The step in which the log is grown (written as zeros and synced).
const GROW: u64 = 4 << 20;
/// Dead records past this (and past the live ones) make the log compact itself.
const COMPACT_AFTER: u64 = 8 << 20;
/// A record's frame before its payload: magic, length, CRC32C.
const FRAME: usize = 12;

/// What the log says of one spool, as read back at mount.
#[derive(Debug)]
pub(super) struct Found {
    /// The spool's file name in the queue's directory.
    pub spool: String,
    pub entry: Value,
}

#[derive(Debug)]
pub(super) struct QueueLog {
    path: PathBuf,
    file: std::fs::File,
    /// Where the next record goes.
    end: u64,
    /// How much of the file is written (zeros or records) and synced.
    allocated: u64,
    /// The last record of each spool that is still in the queue: offset and length.
    live: HashMap<String, (u64, u64)>,
    live_bytes: u64,
    /// Dead bytes past which the log is compacted (raised after a compaction that failed).
    compact_after: u64,
}

fn blocks(len: u64) -> u64 {
    len.div_ceil(BLOCK) * BLOCK
}

/// One framed record, padded to whole blocks.
fn frame(spool: &str, entry: Option<&Value>, data: Option<&[u8]>) -> Vec<u8> {
    let head = json!({ "spool": spool, "entry": entry, "data": data.is_some() }).to_string();
    let mut payload = Vec::with_capacity(head.len() + 1 + data.map_or(0, <[u8]>::len));
    payload.extend_from_slice(head.as_bytes());
    payload.push(b'\n');
    payload.extend_from_slice(data.unwrap_or_default());
    let mut rec = Vec::with_capacity(blocks((FRAME + payload.len()) as u64) as usize);
    rec.extend_from_slice(MAGIC);
    rec.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    rec.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    rec.extend_from_slice(&payload);
    rec.resize(blocks(rec.len() as u64) as usize, 0);
    rec
}

/// A record's payload, split into its JSON line and its data.
struct Payload {
    spool: String,
    entry: Option<Value>,
    data: Option<Vec<u8>>,
}

/// The record at `offset`, whole, with its length in the file; `None` at the end of the log.
fn read_record(file: &std::fs::File, offset: u64, size: u64) -> Option<(Payload, u64)> {
    let mut frame_bytes = [0u8; FRAME];
    if offset + FRAME as u64 > size || file.read_exact_at(&mut frame_bytes, offset).is_err() {
        return None;
    }
    if &frame_bytes[..4] != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(frame_bytes[4..8].try_into().ok()?) as u64;
    let crc = u32::from_le_bytes(frame_bytes[8..12].try_into().ok()?);
    if offset + FRAME as u64 + len > size {
        return None;
    }
    let mut payload = vec![0u8; len as usize];
    file.read_exact_at(&mut payload, offset + FRAME as u64)
        .ok()?;
    if crc32c::crc32c(&payload) != crc {
        return None;
    }
    let nl = payload.iter().position(|b| *b == b'\n')?;
    let head: Value = serde_json::from_slice(&payload[..nl]).ok()?;
    let spool = head["spool"].as_str()?.to_string();
    let entry = Some(head["entry"].clone()).filter(|e| !e.is_null());
    let data = head["data"].as_bool()?.then(|| payload[nl + 1..].to_vec());
    Some((Payload { spool, entry, data }, blocks(FRAME as u64 + len)))
}

/// Makes the names in `dir` durable.
pub(super) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// A spool's name must be a plain file name in the queue's directory.
fn plain_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && name != "." && name != ".."
}

impl QueueLog {
    /// Opens (or makes) the log in `dir` and reads it back: what each spool holds, with spools
    /// whose data is in their record written out again. The log is then rewritten with only
    /// those records.
    pub fn open(dir: &Path) -> std::io::Result<(Self, Vec<Found>)> {
        let path = dir.join(QUEUE_LOG);
        let _ = std::fs::remove_file(path.with_extension("log.tmp"));
        let mut found = Vec::new();
        let mut live: HashMap<String, (u64, u64)> = HashMap::new();
        let old = match std::fs::File::open(&path) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        if let Some(old) = &old {
            let size = old.metadata()?.len();
            let mut head = vec![0u8; HEADER.len()];
            if size > 0 && (old.read_exact_at(&mut head, 0).is_err() || head != HEADER) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{} is not a write-back log this s3mount reads",
                        path.display()
                    ),
                ));
            }
            let mut offset = BLOCK;
            while let Some((rec, len)) = read_record(old, offset, size) {
                if rec.entry.is_some() && plain_name(&rec.spool) {
                    live.insert(rec.spool, (offset, len));
                } else {
                    live.remove(&rec.spool);
                }
                offset += len;
            }
            for (spool, (offset, _)) in &live {
                let Some((rec, _)) = read_record(old, *offset, size) else {
                    continue;
                };
                if let Some(data) = &rec.data {
                    std::fs::write(dir.join(spool), data)?;
                }
                found.push(Found {
                    spool: spool.clone(),
                    entry: rec.entry.unwrap_or_default(),
                });
            }
        }
        let log = Self::rewrite(&path, old.as_ref(), &live)?;
        Ok((log, found))
    }

    /// A new log at `path` holding the records `live` names in `old`, synced and in place.
    fn rewrite(
        path: &Path,
        old: Option<&std::fs::File>,
        live: &HashMap<String, (u64, u64)>,
    ) -> std::io::Result<Self> {
        let tmp = path.with_extension("log.tmp");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        let mut head = HEADER.to_vec();
        head.resize(BLOCK as usize, 0);
        file.write_all(&head)?;
        let mut end = BLOCK;
        let mut moved = HashMap::new();
        let mut live_bytes = 0;
        if let Some(old) = old {
            for (spool, (offset, len)) in live {
                let mut rec = vec![0u8; *len as usize];
                old.read_exact_at(&mut rec, *offset)?;
                file.write_all(&rec)?;
                moved.insert(spool.clone(), (end, *len));
                end += len;
                live_bytes += len;
            }
        }
        let mut log = Self {
            path: path.to_path_buf(),
            file,
            end,
            allocated: end,
            live: moved,
            live_bytes,
            compact_after: COMPACT_AFTER,
        };
        log.grow(end + GROW)?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
        Ok(log)
    }

    /// Makes the file at least `to` bytes of synced zeros past its records.
    fn grow(&mut self, to: u64) -> std::io::Result<()> {
        if to <= self.allocated {
            return Ok(());
        }
        let to = to.max(self.allocated + GROW).div_ceil(GROW) * GROW;
        let zeros = vec![0u8; 1 << 20];
        let mut at = self.allocated;
        while at < to {
            let n = (to - at).min(zeros.len() as u64);
            self.file.write_all_at(&zeros[..n as usize], at)?;
            at += n;
        }
        self.file.sync_all()?;
        self.allocated = to;
        Ok(())
    }

    /// Removes the log (nothing is pending: a later mount needs nothing of it).
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }

    /// Records that `spool` holds what `entry` says, with the file's bytes when `data` has
    /// them; durable when this returns.
    pub fn put(&mut self, spool: &str, entry: &Value, data: Option<&[u8]>) -> std::io::Result<()> {
        self.append(spool, Some(entry), data, true)
    }

    /// Records that `spool` left the queue. Not synced: a crash that loses this record makes
    /// the next mount store the file again, which finds its own object and counts it stored.
    pub fn gone(&mut self, spool: &str) -> std::io::Result<()> {
        if !self.live.contains_key(spool) {
            return Ok(());
        }
        self.append(spool, None, None, false)
    }

    fn append(
        &mut self,
        spool: &str,
        entry: Option<&Value>,
        data: Option<&[u8]>,
        sync: bool,
    ) -> std::io::Result<()> {
        let rec = frame(spool, entry, data);
        let len = rec.len() as u64;
        self.grow(self.end + len)?;
        self.file.write_all_at(&rec, self.end)?;
        if sync {
            self.file.sync_data()?;
        }
        if let Some((_, old)) = self.live.remove(spool) {
            self.live_bytes -= old;
        }
        if entry.is_some() {
            self.live.insert(spool.to_string(), (self.end, len));
            self.live_bytes += len;
        }
        self.end += len;
        let dead = self.end - BLOCK - self.live_bytes;
        if dead > self.compact_after && dead > self.live_bytes {
            // The record is durable already: a compaction that fails (a full disk) fails
            // nothing, and is tried again once as much more is dead.
            match Self::rewrite(&self.path, Some(&self.file), &self.live) {
                Ok(log) => *self = log,
                Err(e) => {
                    tracing::warn!(
                        "the write-back log {} could not be compacted ({e}); it grows until \
                         a later compaction or the next mount",
                        self.path.display()
                    );
                    self.compact_after = dead + COMPACT_AFTER;
                }
            }
        }
        Ok(())
    }

    /// How many spools the log holds, and its length (for tests).
    #[cfg(test)]
    fn state(&self) -> (usize, u64) {
        (self.live.len(), self.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u64) -> Value {
        json!({ "key": format!("k{n}"), "size": n })
    }

    #[test]
    fn the_last_record_of_each_spool_is_read_back_and_data_restores_its_spool() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut log, found) = QueueLog::open(dir.path()).unwrap();
            assert!(found.is_empty());
            log.put("spool-a", &entry(1), Some(b"first")).unwrap();
            log.put("spool-b", &entry(2), None).unwrap();
            log.put("spool-a", &entry(3), Some(b"second version"))
                .unwrap();
            log.put("spool-c", &entry(4), Some(b"gone soon")).unwrap();
            log.gone("spool-c").unwrap();
        }
        let (log, mut found) = QueueLog::open(dir.path()).unwrap();
        found.sort_by(|a, b| a.spool.cmp(&b.spool));
        let names: Vec<_> = found.iter().map(|f| f.spool.as_str()).collect();
        assert_eq!(names, ["spool-a", "spool-b"]);
        assert_eq!(found[0].entry, entry(3));
        assert_eq!(
            std::fs::read(dir.path().join("spool-a")).unwrap(),
            b"second version"
        );
        assert!(!dir.path().join("spool-c").exists());
        // The reopened log holds only the two live records.
        assert_eq!(log.state(), (2, 3 * BLOCK));
    }

    #[test]
    fn a_torn_record_ends_the_log_and_what_came_before_stays() {
        let dir = tempfile::tempdir().unwrap();
        let offset;
        {
            let (mut log, _) = QueueLog::open(dir.path()).unwrap();
            log.put("spool-a", &entry(1), Some(&[7u8; 5000])).unwrap();
            offset = log.end;
            log.put("spool-b", &entry(2), Some(&[8u8; 100])).unwrap();
            log.put("spool-c", &entry(3), None).unwrap();
        }
        // spool-b's record is damaged: it and everything after it were never synced.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join(QUEUE_LOG))
            .unwrap();
        f.write_all_at(b"X", offset + FRAME as u64 + 3).unwrap();
        let (_, found) = QueueLog::open(dir.path()).unwrap();
        let names: Vec<_> = found.iter().map(|f| f.spool.as_str()).collect();
        assert_eq!(names, ["spool-a"]);
        assert_eq!(
            std::fs::read(dir.path().join("spool-a")).unwrap(),
            vec![7u8; 5000]
        );
    }

    #[test]
    fn dead_records_are_compacted_away_while_live_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = QueueLog::open(dir.path()).unwrap();
        log.put("spool-keep", &entry(0), Some(b"kept")).unwrap();
        for n in 0..5000u64 {
            let name = format!("spool-{n}");
            log.put(&name, &entry(n), Some(&[1u8; 3000])).unwrap();
            log.gone(&name).unwrap();
        }
        let (live, end) = log.state();
        assert_eq!(live, 1);
        assert!(end < COMPACT_AFTER + 4 * BLOCK, "{end}");
        drop(log);
        let (_, found) = QueueLog::open(dir.path()).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].entry, entry(0));
        assert_eq!(
            std::fs::read(dir.path().join("spool-keep")).unwrap(),
            b"kept"
        );
    }

    #[test]
    fn a_file_that_is_not_a_log_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(QUEUE_LOG), b"something else").unwrap();
        let err = QueueLog::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("not a write-back log"), "{err}");
    }
}
