//! Where a cluster keeps its follow-graph snapshots in NATS JetStream, and who writes them.
//!
//! - Object store `<stream>-graph`: one object `graph-<stream seq>` per snapshot
//!   ([`GraphSnapshot`] bytes); the newest [`KEEP_SNAPSHOTS`] are kept.
//! - Key-value bucket `<stream>-snapshot`, key `snapshot`: the [`Pointer`] to the newest
//!   complete object (stream seq, event seq, object name, checksum, time written). It is moved
//!   only after its object is stored whole, and only forward (revision-checked), so it never
//!   names a partial object and two writers cannot move it back.
//! - Key-value bucket `<stream>-snapshot-lock` (entries expire after `--snapshot-lock-ttl-s`),
//!   key `writer`: the edge that writes snapshots. It is taken with create-if-absent and kept
//!   with revision-checked updates; when its holder is gone the entry expires and another edge
//!   creates it. Two writers for a moment (a stalled holder) are harmless: both write the same
//!   kind of snapshot and the pointer only moves forward.
//!
//! An object put cut off halfway (NATS or the writer gone) leaves chunk messages
//! (`$O.<bucket>.C.<id>`) that no object's metadata names; nothing would ever delete them. The
//! writer looks for such orphans when it takes the lock and after each snapshot, and purges
//! an orphan once it has seen it unchanged (same chunk count) for at least the lock's
//! lifetime: a put in progress adds chunks, and a writer stalled for longer has lost the lock.
//! A snapshot is also read back whole before the pointer moves to it, so even a put whose
//! chunks were purged under it (a writer stalled past that) is never pointed to.
//!
//! The buckets' streams (`KV_<bucket>`, `OBJ_<bucket>`) are created by hand, as the client's
//! own bucket creation does not work against nats-server 2.9.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, kv, object_store, stream};
use futures_lite::StreamExt;
use tokio::io::AsyncReadExt;

use super::snapshot::{checksum, GraphSnapshot};
use crate::config::NatsConfig;

/// Snapshot objects kept (the pointer's and the one before it).
pub const KEEP_SNAPSHOTS: usize = 2;
/// The key of the pointer to the newest snapshot.
pub const POINTER_KEY: &str = "snapshot";
/// The key of the snapshot writer's lock.
pub const LOCK_KEY: &str = "writer";
/// Object chunk size.
const CHUNK_BYTES: usize = 1024 * 1024;
/// Longest time a listing of the object store, or the read of one snapshot, may take: the
/// client's listing and object reads wait for every message the stream says it holds, which
/// after a nats-server crash it may fail to deliver; give up rather than hang the edge.
const STORE_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts to move the pointer when another writer moves it at the same time.
const POINTER_ATTEMPTS: usize = 3;
/// The server's default duplicate window; a bucket with shorter-lived entries gets theirs.
const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// The name of an object holding the snapshot as of `stream_seq`.
pub fn object_name(stream_seq: u64) -> String {
    format!("graph-{stream_seq}")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

/// What the pointer key says about the newest snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pointer {
    /// The last stream message in the snapshot.
    pub stream_seq: u64,
    /// The last event seq of the open session in it (None: no session open).
    pub event_seq: Option<u64>,
    /// Its object's name.
    pub object: String,
    /// The snapshot's own checksum (its last 8 bytes).
    pub checksum: u64,
    /// Milliseconds since the Unix epoch when it was written.
    pub written_ms: u64,
}

impl Pointer {
    /// One line of `key=value` fields.
    pub fn encode(&self) -> String {
        let event_seq = self
            .event_seq
            .map_or_else(|| "none".to_string(), |seq| seq.to_string());
        format!(
            "stream_seq={} event_seq={event_seq} object={} checksum={:016x} written_ms={}",
            self.stream_seq, self.object, self.checksum, self.written_ms
        )
    }

    /// Reads [`encode`](Self::encode)'s line.
    pub fn parse(bytes: &[u8]) -> Result<Pointer, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "pointer is not UTF-8".to_string())?;
        let field = |name: &str| -> Result<&str, String> {
            text.split(' ')
                .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
                .ok_or_else(|| format!("pointer has no {name}: {text:?}"))
        };
        let number = |name: &str| -> Result<u64, String> {
            field(name)?
                .parse()
                .map_err(|_| format!("pointer's {name} is not a number: {text:?}"))
        };
        Ok(Pointer {
            stream_seq: number("stream_seq")?,
            event_seq: match field("event_seq")? {
                "none" => None,
                _ => Some(number("event_seq")?),
            },
            object: field("object")?.to_string(),
            checksum: u64::from_str_radix(field("checksum")?, 16)
                .map_err(|_| format!("pointer's checksum is not hex: {text:?}"))?,
            written_ms: number("written_ms")?,
        })
    }

    /// How long ago the snapshot was written.
    pub fn age(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.written_ms))
    }
}

/// The snapshot buckets of one cluster.
pub struct SnapshotStore {
    pointers: kv::Store,
    locks: kv::Store,
    objects: object_store::ObjectStore,
    /// The object store's stream (`OBJ_<bucket>`).
    objects_stream: stream::Stream,
    /// The object store's name.
    bucket: String,
    /// Chunk subjects no object names: their chunk count, and when first seen so.
    orphans: Mutex<HashMap<String, (usize, Instant)>>,
}

/// Opens a key-value bucket, creating its stream first when it does not exist.
pub(super) async fn key_value(
    context: &jetstream::Context,
    bucket: &str,
    max_age: Duration,
) -> Result<kv::Store, String> {
    let duplicate_window = if max_age.is_zero() {
        DEFAULT_DUPLICATE_WINDOW
    } else {
        max_age.min(DEFAULT_DUPLICATE_WINDOW)
    };
    context
        .get_or_create_stream(stream::Config {
            name: format!("KV_{bucket}"),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            max_age,
            duplicate_window,
            storage: stream::StorageType::File,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            num_replicas: 1,
            ..Default::default()
        })
        .await
        .map_err(|error| format!("cannot create bucket {bucket}: {error}"))?;
    context
        .get_key_value(bucket)
        .await
        .map_err(|error| format!("cannot open bucket {bucket}: {error}"))
}

impl SnapshotStore {
    /// Opens (creating when needed) the snapshot buckets of the cluster's stream.
    pub async fn open(
        context: &jetstream::Context,
        config: &NatsConfig,
    ) -> Result<SnapshotStore, String> {
        let stream = &config.stream;
        let pointers = key_value(context, &format!("{stream}-snapshot"), Duration::ZERO).await?;
        let locks = key_value(
            context,
            &format!("{stream}-snapshot-lock"),
            config.snapshot_lock_ttl,
        )
        .await?;
        let bucket = format!("{stream}-graph");
        let objects_stream = context
            .get_or_create_stream(stream::Config {
                name: format!("OBJ_{bucket}"),
                subjects: vec![format!("$O.{bucket}.C.>"), format!("$O.{bucket}.M.>")],
                storage: stream::StorageType::File,
                discard: stream::DiscardPolicy::New,
                allow_rollup: true,
                allow_direct: true,
                num_replicas: 1,
                ..Default::default()
            })
            .await
            .map_err(|error| format!("cannot create object store {bucket}: {error}"))?;
        let objects = context
            .get_object_store(&bucket)
            .await
            .map_err(|error| format!("cannot open object store {bucket}: {error}"))?;
        Ok(SnapshotStore {
            pointers,
            locks,
            objects,
            objects_stream,
            bucket,
            orphans: Mutex::default(),
        })
    }

    /// The pointer to the newest snapshot and its revision (None: no snapshot yet).
    pub async fn pointer(&self) -> Result<Option<(Pointer, u64)>, String> {
        let entry = self
            .pointers
            .entry(POINTER_KEY)
            .await
            .map_err(|error| format!("cannot read the snapshot pointer: {error}"))?;
        match entry {
            Some(entry) if entry.operation == kv::Operation::Put => {
                Ok(Some((Pointer::parse(&entry.value)?, entry.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Loads the snapshot the pointer names, checking it against the pointer (None: no
    /// snapshot yet).
    pub async fn load_newest(&self) -> Result<Option<(Pointer, GraphSnapshot)>, String> {
        let Some((pointer, _)) = self.pointer().await? else {
            return Ok(None);
        };
        let bytes = self.read_object(&pointer.object).await?;
        let snapshot = GraphSnapshot::decode(&bytes)
            .map_err(|error| format!("snapshot {}: {error}", pointer.object))?;
        let sum = checksum(&bytes[..bytes.len() - 8]);
        if sum != pointer.checksum || snapshot.stream_seq != pointer.stream_seq {
            return Err(format!(
                "snapshot {} does not match its pointer ({})",
                pointer.object,
                pointer.encode()
            ));
        }
        Ok(Some((pointer, snapshot)))
    }

    /// The bytes of the object `name`.
    async fn read_object(&self, name: &str) -> Result<Vec<u8>, String> {
        tokio::time::timeout(STORE_READ_TIMEOUT, self.read_object_untimed(name))
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "reading snapshot {name} took over {} s",
                    STORE_READ_TIMEOUT.as_secs()
                ))
            })
    }

    async fn read_object_untimed(&self, name: &str) -> Result<Vec<u8>, String> {
        let mut object = self
            .objects
            .get(name)
            .await
            .map_err(|error| format!("cannot open snapshot {name}: {error}"))?;
        let mut bytes = Vec::new();
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(|error| format!("cannot read snapshot {name}: {error}"))?;
        Ok(bytes)
    }

    /// Stores a snapshot whole, reads it back, then moves the pointer to it unless the pointer already names
    /// a snapshot as new or newer, then deletes all but the newest [`KEEP_SNAPSHOTS`]. Returns
    /// the new pointer (None: a newer snapshot was there).
    pub async fn write(&self, snapshot: &GraphSnapshot) -> Result<Option<Pointer>, String> {
        let bytes = snapshot.encode();
        let name = object_name(snapshot.stream_seq);
        let meta = object_store::ObjectMetadata {
            name: name.clone(),
            chunk_size: Some(CHUNK_BYTES),
            ..Default::default()
        };
        self.objects
            .put(meta, &mut bytes.as_slice())
            .await
            .map_err(|error| format!("cannot store snapshot {name}: {error}"))?;
        if self.read_object(&name).await? != bytes {
            return Err(format!(
                "snapshot {name} reads back different from what was stored; not pointed to"
            ));
        }
        let pointer = Pointer {
            stream_seq: snapshot.stream_seq,
            event_seq: snapshot.event_seq,
            object: name,
            checksum: u64::from_le_bytes(bytes[bytes.len() - 8..].try_into().expect("8 bytes")),
            written_ms: now_ms(),
        };
        let mut moved = false;
        for _ in 0..POINTER_ATTEMPTS {
            let current = self.pointer().await?;
            let outcome = match &current {
                Some((newer, _)) if newer.stream_seq >= pointer.stream_seq => break,
                Some((_, revision)) => self
                    .pointers
                    .update(POINTER_KEY, pointer.encode().into(), *revision)
                    .await
                    .map_err(|error| error.to_string()),
                None => self
                    .pointers
                    .create(POINTER_KEY, pointer.encode().into())
                    .await
                    .map_err(|error| error.to_string()),
            };
            if outcome.is_ok() {
                moved = true;
                break;
            }
        }
        self.prune().await?;
        Ok(moved.then_some(pointer))
    }

    /// Deletes every snapshot object but the newest [`KEEP_SNAPSHOTS`] and the pointer's.
    async fn prune(&self) -> Result<(), String> {
        let keep = self.pointer().await?.map(|(pointer, _)| pointer.object);
        let seqs = self.object_seqs().await?;
        for seq in seqs.into_iter().skip(KEEP_SNAPSHOTS) {
            let name = object_name(seq);
            if keep.as_deref() == Some(name.as_str()) {
                continue;
            }
            self.objects
                .delete(&name)
                .await
                .map_err(|error| format!("cannot delete snapshot {name}: {error}"))?;
        }
        Ok(())
    }

    /// Purges the chunks of cut-off puts: chunk subjects that no object names and that were
    /// seen so, with the same chunk count, at least `grace` ago. Remembers the others for the
    /// next call. Returns the chunk messages purged.
    pub async fn purge_orphan_chunks(&self, grace: Duration) -> Result<u64, String> {
        let named: std::collections::HashSet<String> = self
            .objects_listed()
            .await?
            .into_iter()
            .map(|info| info.nuid)
            .collect();
        let prefix = format!("$O.{}.C.", self.bucket);
        let mut subjects = self
            .objects_stream
            .info_with_subjects(format!("{prefix}>"))
            .await
            .map_err(|error| format!("cannot list snapshot chunks: {error}"))?;
        let mut unnamed = HashMap::new();
        while let Some(entry) = subjects.next().await {
            let (subject, chunks) =
                entry.map_err(|error| format!("cannot list snapshot chunks: {error}"))?;
            let nuid = subject.strip_prefix(&prefix).unwrap_or(&subject);
            if !named.contains(nuid) {
                unnamed.insert(subject, chunks);
            }
        }
        let now = Instant::now();
        let due: Vec<String> = {
            let mut orphans = self.orphans.lock().unwrap_or_else(|e| e.into_inner());
            orphans.retain(|subject, (chunks, _)| unnamed.get(subject) == Some(chunks));
            for (subject, chunks) in unnamed {
                orphans.entry(subject).or_insert((chunks, now));
            }
            orphans
                .iter()
                .filter(|(_, (_, seen))| now.duration_since(*seen) >= grace)
                .map(|(subject, _)| subject.clone())
                .collect()
        };
        let mut purged = 0;
        for subject in due {
            let response = self
                .objects_stream
                .purge()
                .filter(subject.clone())
                .await
                .map_err(|error| format!("cannot purge orphan chunks {subject}: {error}"))?;
            purged += response.purged;
            self.orphans
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&subject);
        }
        Ok(purged)
    }

    /// The stream seqs of the snapshot objects in the store, newest first.
    pub async fn object_seqs(&self) -> Result<Vec<u64>, String> {
        let mut seqs = Vec::new();
        for info in self.objects_listed().await? {
            if let Some(seq) = info
                .name
                .strip_prefix("graph-")
                .and_then(|seq| seq.parse::<u64>().ok())
            {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable_by(|a, b| b.cmp(a));
        Ok(seqs)
    }

    /// Every object in the store that is not deleted.
    ///
    /// Not the object store's own `list()`: that is an ordered consumer which ends when a
    /// delivered message reports nothing pending, and right after nats-server was killed and
    /// restarted it was seen waiting for good (a pending count that never reached 0). Here the
    /// metadata subjects come from the stream's subject counts and each object's metadata from
    /// a last-message-by-subject request: requests with answers, no consumer.
    async fn objects_listed(&self) -> Result<Vec<object_store::ObjectInfo>, String> {
        let listing = async {
            let prefix = format!("$O.{}.M.", self.bucket);
            let mut subjects = self
                .objects_stream
                .info_with_subjects(format!("{prefix}>"))
                .await
                .map_err(|error| format!("cannot list snapshots: {error}"))?;
            let mut metadata_subjects = Vec::new();
            while let Some(entry) = subjects.next().await {
                let (subject, _) =
                    entry.map_err(|error| format!("cannot list snapshots: {error}"))?;
                metadata_subjects.push(subject);
            }
            let mut infos = Vec::new();
            for subject in metadata_subjects {
                let message = match self
                    .objects_stream
                    .get_last_raw_message_by_subject(&subject)
                    .await
                {
                    Ok(message) => message,
                    // Purged since the subjects were counted.
                    Err(error)
                        if error.kind() == stream::LastRawMessageErrorKind::NoMessageFound =>
                    {
                        continue
                    }
                    Err(error) => {
                        return Err(format!("cannot read snapshot metadata {subject}: {error}"))
                    }
                };
                let info: object_store::ObjectInfo = serde_json::from_slice(&message.payload)
                    .map_err(|error| format!("bad snapshot metadata {subject}: {error}"))?;
                if !info.deleted {
                    infos.push(info);
                }
            }
            Ok(infos)
        };
        tokio::time::timeout(STORE_READ_TIMEOUT, listing)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "listing snapshots took over {} s",
                    STORE_READ_TIMEOUT.as_secs()
                ))
            })
    }
}

/// This edge's claim on the snapshot writer's lock.
pub struct WriterLock {
    holder: String,
    revision: Option<u64>,
    checked: Option<Instant>,
}

impl WriterLock {
    /// A claim for a holder named `holder` (unique per process).
    pub fn new(holder: String) -> Self {
        WriterLock {
            holder,
            revision: None,
            checked: None,
        }
    }

    /// Whether [`hold`](Self::hold) will look at the lock in NATS (a third of its lifetime
    /// passed since the last look).
    pub fn due(&self, ttl: Duration) -> bool {
        self.checked
            .is_none_or(|checked| checked.elapsed() >= ttl / 3)
    }

    /// Whether this edge holds the lock now: refreshes it (or tries to take it) when a third
    /// of its lifetime passed since the last look.
    pub async fn hold(&mut self, store: &SnapshotStore, ttl: Duration) -> bool {
        if !self.due(ttl) {
            return self.revision.is_some();
        }
        self.checked = Some(Instant::now());
        let value = self.holder.clone().into();
        self.revision = match self.revision {
            Some(revision) => store.locks.update(LOCK_KEY, value, revision).await.ok(),
            None => store.locks.create(LOCK_KEY, value).await.ok(),
        };
        self.revision.is_some()
    }
}
