//! The decision log: every placement, refusal, preemption, release and recovery step the
//! controller takes, with the numbers that decided it, under `/ray/log/<seq>`. Operators
//! read it with `ray cluster events` and `ray cluster explain VM` (one VM's history), so
//! "why is my VM there (or nowhere)?" always has an answer in the store.
//!
//! Sequence numbers are microseconds since the Unix epoch, bumped past the last one this
//! process wrote, and each entry is written only if its key is absent: two controllers
//! (an old leader finishing a write) never overwrite each other's entries.
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::keys;
use crate::store::{Commit, Cond, Store, StoreError, Txn};

/// What kind of decision an entry records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A VM got a host (its run token, epoch 1).
    Placed,
    /// A VM could not be placed; the message says why, host by host.
    Refused,
    /// A lower-tier VM was evicted to make room for a higher-tier one.
    Preempted,
    /// A deleted VM's run token was released (its agent stops it).
    Released,
    /// A controller took the lead.
    Leader,
    /// A successor controller finished or undid an operation its predecessor recorded.
    Recovered,
    /// A live migration started: source, target and why that target.
    Migrating,
    /// A live migration ended with the VM on its target (the run token moved).
    Migrated,
    /// A live migration was refused, failed or aborted: the VM stays on its source.
    MigrationFailed,
    /// A draining host has no VMs left.
    Drained,
    /// A host back from maintenance is Rejoining: the checks it waits for.
    Rejoining,
    /// A rejoining host passed its checks (fresh lease, inventory re-reported, no stale
    /// VMM) and is Ready.
    Rejoined,
    /// A host's lease lapsed: its VMs fenced themselves; HA VMs restart elsewhere after
    /// the grace.
    LeaseLapsed,
    /// HA restart: a VM of a host whose lease lapsed runs on another host now (the run
    /// token moved, revision-checked), from its checkpoint or a fresh boot.
    Restarted,
    /// Host loads stayed uneven: the live migration that would even them out most, with
    /// the imbalance before and after and its cost against its benefit (recommend-only).
    RebalanceRecommended,
}

/// One entry of the log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Its sequence number (the key's suffix).
    #[serde(default)]
    pub seq: u64,
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub kind: Kind,
    #[serde(default)]
    pub vm: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    /// One sentence for a person.
    pub message: String,
    /// The numbers behind it (free resources, tiers, counts of refusals...).
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Entry {
    pub fn new(kind: Kind, vm: Option<&str>, host: Option<&str>, message: String) -> Entry {
        Entry {
            seq: 0,
            at_ms: now_us() / 1000,
            kind,
            vm: vm.map(String::from),
            host: host.map(String::from),
            message,
            data: serde_json::Value::Null,
        }
    }

    pub fn with(mut self, data: serde_json::Value) -> Entry {
        self.data = data;
        self
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Appends entries to the log.
#[derive(Debug, Default)]
pub struct Writer {
    last: u64,
}

impl Writer {
    /// Writes `entry`; returns its sequence number, or `None` when the store refused the
    /// write for another reason than a taken sequence number (a fenced store: this writer
    /// no longer leads).
    pub async fn append<S: Store>(
        &mut self,
        s: &S,
        entry: Entry,
    ) -> Result<Option<u64>, StoreError> {
        Ok(self
            .append_all(s, vec![entry])
            .await?
            .and_then(|v| v.first().copied()))
    }

    /// Writes `entries` in one transaction (keep them under etcd's 128 operations per
    /// transaction); returns their sequence numbers, or `None` as [`Writer::append`].
    pub async fn append_all<S: Store>(
        &mut self,
        s: &S,
        mut entries: Vec<Entry>,
    ) -> Result<Option<Vec<u64>>, StoreError> {
        if entries.is_empty() {
            return Ok(Some(Vec::new()));
        }
        loop {
            let mut txn = Txn::new();
            let mut seqs = Vec::new();
            for e in &mut entries {
                let seq = now_us().max(self.last + 1);
                self.last = seq;
                e.seq = seq;
                let value = serde_json::to_vec(&*e).unwrap_or_default();
                txn = txn
                    .when(keys::log(seq), Cond::Absent)
                    .put(keys::log(seq), value);
                seqs.push(seq);
            }
            if let Commit::Done(_) = s.commit(txn).await? {
                return Ok(Some(seqs));
            }
            let mut taken = false;
            for seq in &seqs {
                taken |= s.get(&keys::log(*seq)).await?.is_some();
            }
            if !taken {
                return Ok(None);
            }
        }
    }
}

/// The log's entries in order; only `vm`'s when given. Entries that do not parse are
/// skipped (a newer controller may write kinds this one does not know).
pub async fn read<S: Store>(s: &S, vm: Option<&str>) -> Result<Vec<Entry>, StoreError> {
    let listing = s.list(keys::LOG).await?;
    Ok(listing
        .kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice::<Entry>(&kv.value).ok())
        .filter(|e| vm.is_none() || e.vm.as_deref() == vm)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn entries_come_back_in_order_and_by_vm() {
        let (s, dir) = crate::testing::fresh_redb("log");
        let mut w = Writer::default();
        for i in 0..5 {
            let vm = if i % 2 == 0 { "a" } else { "b" };
            w.append(
                &s,
                Entry::new(Kind::Placed, Some(vm), Some("h1"), format!("step {i}")),
            )
            .await
            .unwrap();
        }
        let all = read(&s, None).await.unwrap();
        let msgs: Vec<&str> = all.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(msgs, ["step 0", "step 1", "step 2", "step 3", "step 4"]);
        assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
        assert_eq!(read(&s, Some("b")).await.unwrap().len(), 2);
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
