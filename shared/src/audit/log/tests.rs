use serde_json::json;

use super::*;
use crate::audit::export::{Format, line, parse_line};
use crate::audit::verify;
use crate::store::MemStore;
use crate::testing::{HookedStore, at};

fn record(n: u64) -> Record {
    Record {
        actor: if n.is_multiple_of(2) { "alice".into() } else { "bob".into() },
        action: if n.is_multiple_of(3) { "rule.put" } else { "request.created" },
        subject: Subject { request: Some(format!("r{n}")), policy: Some("demo-vm".into()) },
        source_ip: Some("203.0.113.7".into()),
        actor_name: None,
        outcome: Outcome::Ok,
        details: json!({"n": n}),
    }
}

const KEY: &[u8] = b"checkpoint key";
const CHECKPOINTING: Option<Checkpointing> = Some(Checkpointing { key: KEY, every: 5 });

fn trail(n: u64) -> MemStore {
    let kv = MemStore::default();
    for i in 1..=n {
        append(&kv, record(i), at(i as i64), Some(Checkpointing { key: KEY, every: 5 })).unwrap();
    }
    kv
}

fn broken_at(kv: &MemStore) -> Option<u64> {
    verify_stored(kv, 1, None, CHECKPOINTING).unwrap().chain.broken.map(|b| b.seq)
}

#[test]
fn appends_are_numbered_from_one_chained_and_kept_under_their_own_keys() {
    let kv = trail(7);
    let events: Vec<AuditEvent> = range(&kv, 1, 7).collect::<Result<_, _>>().unwrap();
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(verify(events.clone(), None).broken, None);
    assert_eq!(head(&kv).unwrap().as_ref(), events.last());
    let report = verify_stored(&kv, 1, None, CHECKPOINTING).unwrap();
    assert_eq!((report.chain.checked, report.chain.broken), (7, None));
    assert_eq!(report.checkpoint, Some(CheckpointStatus { seq: 5, verified: true }));
}

#[test]
fn a_lost_race_retries_after_the_winner_so_numbers_stay_contiguous() {
    let kv = HookedStore::over(trail(2));
    let mut rivals = 3;
    kv.before_swap(move |mem, key| {
        if key == keys::AUDIT_HEAD && rivals > 0 {
            rivals -= 1;
            append(mem, record(99), at(0), None)?;
        }
        Ok(())
    });
    let event = append(&kv, record(3), at(3), None).unwrap();
    assert_eq!(event.seq, 6, "three other appends went in first");
    let events: Vec<AuditEvent> = range(&kv.mem, 1, 6).collect::<Result<_, _>>().unwrap();
    assert_eq!(events.len(), 6);
    assert_eq!(verify(events, None).broken, None);
}

#[test]
fn times_never_go_backwards_along_the_chain() {
    let kv = trail(3);
    let event = append(&kv, record(4), at(-60), None).unwrap();
    assert_eq!(event.at, at(3), "a lagging clock takes the last event's time");
}

#[test]
fn an_event_left_only_in_the_head_is_archived_by_the_next_append() {
    let kv = trail(3);
    kv.delete(&keys::audit_event(3)).unwrap();
    assert_eq!(broken_at(&kv), None, "the head holds event 3");
    append(&kv, record(4), at(4), None).unwrap();
    assert!(matches!(read(&kv, 3).unwrap(), Slot::Event(e) if e.seq == 3));
    assert_eq!(broken_at(&kv), None);
}

#[test]
fn tampering_is_reported_at_the_right_sequence_number() {
    let changed = trail(6);
    let mut event: serde_json::Value = serde_json::from_slice(&changed.get("audit:e:3").unwrap().unwrap()).unwrap();
    event["details"]["n"] = json!(42);
    changed.set("audit:e:3", event.to_string().as_bytes()).unwrap();
    assert_eq!(broken_at(&changed), Some(3));

    let deleted = trail(6);
    deleted.delete("audit:e:2").unwrap();
    assert_eq!(broken_at(&deleted), Some(2));

    let reordered = trail(6);
    let (second, third) = (reordered.get("audit:e:2").unwrap().unwrap(), reordered.get("audit:e:3").unwrap().unwrap());
    reordered.set("audit:e:2", &third).unwrap();
    reordered.set("audit:e:3", &second).unwrap();
    assert_eq!(broken_at(&reordered), Some(2));

    let garbled = trail(6);
    garbled.set("audit:e:4", b"{oops").unwrap();
    assert_eq!(broken_at(&garbled), Some(4));

    // Cutting the tail back to event 3 (head included) shows against the checkpoint at 5.
    let truncated = trail(6);
    let third = truncated.get("audit:e:3").unwrap().unwrap();
    truncated.set(keys::AUDIT_HEAD, &third).unwrap();
    for seq in 4..=6 {
        truncated.delete(&keys::audit_event(seq)).unwrap();
    }
    let report = verify_stored(&truncated, 1, None, CHECKPOINTING).unwrap();
    assert_eq!(report.chain.broken.map(|b| b.seq), Some(4));
    assert!(verify_stored(&truncated, 1, None, None).unwrap().chain.broken.is_none(), "the chain alone cannot tell");

    // A head swapped for another event is caught too.
    let replaced = trail(6);
    let mut forged: AuditEvent = serde_json::from_slice(&replaced.get(keys::AUDIT_HEAD).unwrap().unwrap()).unwrap();
    forged.actor = "mallory".into();
    forged.hash = forged.compute_hash();
    replaced.set(keys::AUDIT_HEAD, &serde_json::to_vec(&forged).unwrap()).unwrap();
    assert_eq!(broken_at(&replaced), Some(6));
}

#[test]
fn a_range_verifies_from_the_event_before_it() {
    let kv = trail(9);
    let report = verify_stored(&kv, 4, Some(6), None).unwrap();
    assert_eq!((report.from, report.to, report.chain.checked, report.chain.broken), (4, 6, 3, None));
    kv.delete("audit:e:3").unwrap();
    assert_eq!(verify_stored(&kv, 4, Some(6), None).unwrap().chain.broken.map(|b| b.seq), Some(3));
}

#[test]
fn pages_filter_and_continue_from_their_cursor() {
    let kv = trail(12);
    let filter = Filter { actor: Some("alice".into()), ..Filter::default() };
    let first = page(&kv, &filter, None, 4).unwrap();
    assert_eq!(first.events.iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 4, 6, 8]);
    let cursor = first.next_cursor.unwrap().parse().unwrap();
    let second = page(&kv, &filter, Some(cursor), 4).unwrap();
    assert_eq!(second.events.iter().map(|e| e.seq).collect::<Vec<_>>(), [10, 12]);
    assert_eq!(second.next_cursor, None);

    let window = Filter { since: Some(at(5)), until: Some(at(7)), ..Filter::default() };
    assert_eq!(page(&kv, &window, None, 100).unwrap().events.iter().map(|e| e.seq).collect::<Vec<_>>(), [5, 6, 7]);
    let family = Filter { action: Some("rule.".into()), request: Some("r9".into()), ..Filter::default() };
    assert_eq!(page(&kv, &family, None, 100).unwrap().events.iter().map(|e| e.seq).collect::<Vec<_>>(), [9]);
    assert_eq!(page(&MemStore::default(), &filter, None, 4).unwrap(), Page { events: vec![], next_cursor: None });
}

#[test]
fn both_export_formats_read_back_into_a_verifiable_chain() {
    let kv = trail(4);
    for format in [Format::JsonLines, Format::CloudEvents] {
        let text: String = range(&kv, 1, 4).map(|e| line(&e.unwrap(), format)).collect();
        let events: Vec<AuditEvent> = text.lines().map(|l| parse_line(l).unwrap()).collect();
        assert_eq!((events.len(), verify(events, None).broken), (4, None), "{format:?}");
    }
    let cloud: serde_json::Value =
        serde_json::from_str(&line(&head(&kv).unwrap().unwrap(), Format::CloudEvents)).unwrap();
    assert_eq!(
        (cloud["specversion"].as_str(), cloud["type"].as_str(), cloud["subject"].as_str()),
        (Some("1.0"), Some("io.portcullis.audit.request.created"), Some("r4"))
    );
}

#[test]
fn regression_an_append_whose_archive_write_fails_still_counts_as_appended() {
    // The event is in the trail once the head has swapped: reporting the append as failed made
    // the caller skip a change the trail already claimed.
    let kv = MemStore::default();
    append(&kv, record(1), at(1), None).unwrap();
    let event = append(&FailingSet(&kv), record(2), at(2), None).expect("appended");
    assert_eq!(event.seq, 2);
    assert_eq!(verify_stored(&kv, 1, None, None).unwrap().chain.broken, None, "the head stands in for it");
    append(&kv, record(3), at(3), None).unwrap();
    assert!(matches!(read(&kv, 2).unwrap(), Slot::Event(_)), "archived by the next append");
    assert_eq!(verify_stored(&kv, 1, None, None).unwrap().chain.broken, None);
}

/// A store whose plain writes fail while its swaps go through.
struct FailingSet<'a>(&'a dyn KvStore);

impl KvStore for FailingSet<'_> {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.get(key)
    }
    fn set(&self, _: &str, _: &[u8]) -> Result<(), StoreError> {
        Err(StoreError::Backend("injected".into()))
    }
    fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.0.delete(key)
    }
    fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, value: &[u8]) -> Result<bool, StoreError> {
        self.0.compare_and_swap(key, expected, value)
    }
    fn increment(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        self.0.increment(key, delta)
    }
}

#[test]
fn a_missing_or_restored_checkpoint_is_reported_not_skipped() {
    // The head is at 12: the checkpoint due at 10 must be the latest, and in the record.
    let fine = trail(12);
    assert_eq!(broken_at(&fine), None);
    assert_eq!(verify_stored(&fine, 1, None, CHECKPOINTING).unwrap().checkpoint.map(|c| c.seq), Some(10));

    let missing = trail(12);
    missing.delete(keys::AUDIT_CHECKPOINT).unwrap();
    assert_eq!(broken_at(&missing), Some(10), "a missing checkpoint");

    // An older genuine checkpoint put back as the latest (the first step of hiding a cut tail).
    let restored = trail(12);
    let older: Checkpoint =
        serde_json::from_slice(&restored.get(&keys::audit_checkpoint_at(5)).unwrap().unwrap()).unwrap();
    let version = crate::store::load::<Checkpoint>(&restored, keys::AUDIT_CHECKPOINT).unwrap().unwrap().version;
    crate::store::save(&restored, keys::AUDIT_CHECKPOINT, &older, Some(version)).unwrap();
    let report = verify_stored(&restored, 1, None, CHECKPOINTING).unwrap();
    assert_eq!(report.chain.broken.as_ref().map(|b| b.seq), Some(10), "{report:?}");

    // The latest copy without its record.
    let unrecorded = trail(12);
    unrecorded.delete(&keys::audit_checkpoint_at(10)).unwrap();
    assert_eq!(broken_at(&unrecorded), Some(10));

    // Without a key nothing is required (README says what that proves).
    assert_eq!(verify_stored(&missing, 1, None, None).unwrap().chain.broken, None);
}

#[test]
fn checkpoints_catch_up_when_the_key_is_set_late() {
    let kv = MemStore::default();
    for i in 1..=250 {
        append(&kv, record(i), at(i as i64), None).unwrap();
    }
    // Checkpoints every 1000 from now on: the next hundredth event signs, so verify is valid
    // before the 1000th event.
    let late = Some(Checkpointing { key: KEY, every: 1000 });
    for i in 251..=300 {
        append(&kv, record(i), at(i as i64), late).unwrap();
    }
    assert_eq!(latest_checkpoint(&kv).unwrap().map(|c| c.seq), Some(300));
    assert_eq!(verify_stored(&kv, 1, None, late).unwrap().chain.broken, None);
}

#[test]
fn a_batch_is_numbered_and_chained_as_single_appends_are_with_one_swap_of_the_head() {
    let single = trail(5);
    let batched = trail(2);
    let events = append_all(&batched, (3..=5).map(record).collect(), at(3), CHECKPOINTING).unwrap();
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4, 5]);
    assert_eq!(broken_at(&batched), None);
    assert_eq!(head(&batched).unwrap().map(|h| h.seq), Some(5));
    assert_eq!(latest_checkpoint(&batched).unwrap().map(|c| c.seq), Some(5), "a checkpoint due inside a batch");
    // The same records, one by one or together, chain the same way (times aside).
    let actions = |kv: &MemStore| range(kv, 1, 5).map(|e| e.unwrap().action).collect::<Vec<_>>();
    assert_eq!(actions(&single), actions(&batched));
}

#[test]
fn a_batch_whose_archive_write_failed_stands_in_the_head_until_the_next_append_archives_it() {
    let kv = trail(1);
    let events = append_all(&FailingSet(&kv), (2..=4).map(record).collect(), at(2), None).expect("appended");
    assert_eq!(events.len(), 3);
    for seq in 2..=4 {
        assert_eq!(read(&kv, seq).unwrap(), Slot::Missing, "event {seq} is only in the head");
    }
    // Readers find every event of the batch in the head: verify (from any start), pages,
    // ranges (the export and the webhook deliverer).
    assert_eq!(verify_stored(&kv, 1, None, None).unwrap().chain.broken, None);
    assert_eq!(verify_stored(&kv, 4, None, None).unwrap().chain.broken, None);
    assert_eq!(range(&kv, 1, 4).map(|e| e.unwrap().seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
    let page = page(&kv, &Filter::default(), None, 100).unwrap();
    assert_eq!(page.events.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
    // The next appender archives the whole batch before it moves the head on.
    append(&kv, record(5), at(5), None).unwrap();
    for seq in 2..=4 {
        assert!(matches!(read(&kv, seq).unwrap(), Slot::Event(_)), "event {seq} archived");
    }
    assert_eq!(verify_stored(&kv, 1, None, None).unwrap().chain.broken, None);
}

#[test]
fn a_batch_that_loses_the_race_for_the_head_goes_in_after_the_winner() {
    let kv = HookedStore::over(trail(1));
    let mut rival = true;
    kv.before_swap(move |mem, key| {
        if key == keys::AUDIT_HEAD && std::mem::take(&mut rival) {
            append_all(mem, vec![record(90), record(91)], at(1), None)?;
        }
        Ok(())
    });
    let events = append_all(&kv, vec![record(2), record(3)], at(2), None).unwrap();
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 5]);
    kv.clear_hook();
    assert_eq!(verify_stored(&kv.mem, 1, None, None).unwrap().chain.broken, None);
    assert_eq!(range(&kv.mem, 1, 5).map(|e| e.unwrap().seq).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
}

#[test]
fn a_forged_head_batch_neither_overwrites_archived_events_nor_passes_unchained() {
    let kv = trail(3);
    let genuine = kv.get(&keys::audit_event(2)).unwrap();
    let mut events: Vec<AuditEvent> = range(&kv, 2, 3).map(Result::unwrap).collect();
    // A head claiming other contents for event 2 (already archived) and 3.
    events[0].details = json!({"n": "forged"});
    kv.set(keys::AUDIT_HEAD, &serde_json::to_vec(&HeadBatch { batch: events.clone() }).unwrap()).unwrap();
    kv.delete(&keys::audit_event(3)).unwrap();
    append(&kv, record(4), at(4), None).unwrap();
    assert_eq!(kv.get(&keys::audit_event(2)).unwrap(), genuine, "an archived event is never replaced");
    // A batch whose events do not follow one another is refused, not archived.
    events[1].seq = 9;
    kv.set(keys::AUDIT_HEAD, &serde_json::to_vec(&HeadBatch { batch: events }).unwrap()).unwrap();
    assert!(matches!(append(&kv, record(5), at(5), None), Err(StoreError::Corrupt { .. })));
}
