use super::*;
use proptest::prelude::*;

fn key(owner: &str, n: u8) -> ObjectKey {
    ObjectKey::new(owner, ObjectId([n; 32]))
}

fn cache(memory_bytes: u64, disk_bytes: u64) -> Cache {
    Cache::new(Budgets {
        memory_bytes,
        disk_bytes,
    })
}

const S1: ObjectScope = ObjectScope::Session(SessionId(1));

/// Admits and releases at once (the filler is done).
fn put(c: &mut Cache, k: ObjectKey, size: u64, pinned: bool, now: Tick) -> Admission {
    let a = c.admit(k.clone(), size, S1, pinned, now).unwrap();
    assert_eq!(c.release(&k, a.generation), None);
    c.check().unwrap();
    a
}

#[test]
fn memory_fills_then_least_recently_used_spills() {
    let mut c = cache(100, 1000);
    assert_eq!(put(&mut c, key("a", 1), 60, true, 1).tier, Tier::Memory);
    assert_eq!(put(&mut c, key("a", 2), 40, true, 2).tier, Tier::Memory);
    c.touch(&key("a", 1), 3);
    let a = put(&mut c, key("a", 3), 30, true, 4);
    assert_eq!(a.tier, Tier::Memory);
    // 2 was used less recently than 1.
    assert_eq!(a.spill.len(), 1);
    assert_eq!(a.spill[0].0, key("a", 2));
    assert!(a.dropped.is_empty());
    assert_eq!(c.get(&key("a", 2)).unwrap().tier, Tier::Disk);
    assert_eq!(c.usage().memory_used, 90);
    assert_eq!(c.usage().disk_used, 40);
}

#[test]
fn unpinned_spill_before_pinned_even_when_newer() {
    let mut c = cache(100, 1000);
    put(&mut c, key("a", 1), 50, true, 1);
    put(&mut c, key("a", 2), 50, false, 2);
    let a = put(&mut c, key("a", 3), 50, true, 3);
    assert_eq!(a.spill[0].0, key("a", 2));
}

#[test]
fn unpinned_disk_objects_drop_for_room_and_pinned_never() {
    let mut c = cache(10, 100);
    put(&mut c, key("a", 1), 60, true, 1); // too big for memory: disk
    put(&mut c, key("a", 2), 40, false, 2);
    assert_eq!(c.usage().disk_used, 100);
    let a = put(&mut c, key("a", 3), 30, true, 3);
    assert_eq!(a.tier, Tier::Disk);
    assert_eq!(a.dropped.len(), 1);
    assert_eq!(a.dropped[0].key, key("a", 2));
    assert_eq!(a.dropped[0].reason, DropReason::Evicted);
    // Only pinned objects left: 60 + 30 on disk; 20 more does not fit.
    let err = c.admit(key("a", 4), 20, S1, true, 4).unwrap_err();
    let AdmitError::Full(full) = err else {
        panic!("{err:?}")
    };
    let text = full.to_string();
    assert!(text.contains("memory holds 0 of 10 bytes"), "{text}");
    assert!(text.contains("disk 90 of 100 bytes"), "{text}");
    c.check().unwrap();
}

#[test]
fn an_unpinned_object_with_no_disk_room_is_dropped_from_memory() {
    let mut c = cache(100, 50);
    put(&mut c, key("a", 1), 50, true, 1);
    // 1 spills for 2, filling the disk.
    assert_eq!(put(&mut c, key("a", 2), 60, false, 2).spill.len(), 1);
    let a = put(&mut c, key("a", 3), 60, true, 3);
    // The unpinned 2 goes first, and the disk has no room for it: it is dropped.
    assert_eq!(a.dropped.len(), 1);
    assert_eq!(a.dropped[0].key, key("a", 2));
    assert!(a.spill.is_empty());
    assert_eq!((c.usage().memory_used, c.usage().disk_used), (60, 50));
}

#[test]
fn an_object_being_read_is_not_moved_and_goes_when_released() {
    let mut c = cache(100, 100);
    put(&mut c, key("a", 1), 100, true, 1);
    let generation = c.open(&key("a", 1), 2).unwrap();
    // Memory is held by a reader; the new object goes to disk.
    let a = put(&mut c, key("a", 2), 50, true, 3);
    assert_eq!(a.tier, Tier::Disk);
    assert!(a.spill.is_empty());
    assert!(c
        .end_session("a", SessionId(1))
        .iter()
        .any(|d| d.key == key("a", 2)));
    // Held: not gone yet, and a new reader cannot open it.
    assert!(c.get(&key("a", 1)).is_some());
    assert_eq!(c.open(&key("a", 1), 4), None);
    let d = c.release(&key("a", 1), generation).unwrap();
    assert_eq!(d.reason, DropReason::SessionEnded);
    assert_eq!(c.usage().objects, 0);
    c.check().unwrap();
}

#[test]
fn end_session_touches_only_that_owner_and_session() {
    let mut c = cache(1000, 1000);
    put(&mut c, key("a", 1), 10, true, 1);
    put(&mut c, key("b", 1), 10, true, 2);
    let a = c
        .admit(key("a", 2), 10, ObjectScope::Session(SessionId(2)), true, 3)
        .unwrap();
    c.release(&key("a", 2), a.generation);
    let gone = c.end_session("a", SessionId(1));
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0].key, key("a", 1));
    assert!(c.get(&key("b", 1)).is_some());
    assert!(c.get(&key("a", 2)).is_some());
    c.check().unwrap();
}

#[test]
fn a_stale_generation_does_not_touch_a_newer_entry() {
    let mut c = cache(100, 100);
    let first = put(&mut c, key("a", 1), 10, true, 1).generation;
    let reader = c.open(&key("a", 1), 2).unwrap();
    assert!(c
        .discard(&key("a", 1), first, DropReason::Corrupt { chunk: 0 })
        .is_some());
    put(&mut c, key("a", 1), 10, true, 3);
    assert_eq!(c.release(&key("a", 1), reader), None);
    assert_eq!(c.get(&key("a", 1)).unwrap().readers, 0);
    c.check().unwrap();
}

#[test]
fn admitting_twice_is_refused() {
    let mut c = cache(100, 100);
    put(&mut c, key("a", 1), 10, true, 1);
    assert_eq!(
        c.admit(key("a", 1), 10, S1, true, 2),
        Err(AdmitError::Present)
    );
}

#[derive(Debug, Clone)]
enum Op {
    Admit {
        owner: u8,
        n: u8,
        size: u64,
        pinned: bool,
        session: u8,
    },
    Open {
        owner: u8,
        n: u8,
    },
    Release {
        which: usize,
    },
    EndSession {
        owner: u8,
        session: u8,
    },
    Remove {
        owner: u8,
        n: u8,
    },
    Discard {
        owner: u8,
        n: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..2u8, 0..12u8, 0..120u64, any::<bool>(), 0..3u8).prop_map(
            |(owner, n, size, pinned, session)| Op::Admit { owner, n, size, pinned, session }
        ),
        2 => (0..2u8, 0..12u8).prop_map(|(owner, n)| Op::Open { owner, n }),
        2 => (0..8usize).prop_map(|which| Op::Release { which }),
        1 => (0..2u8, 0..3u8).prop_map(|(owner, session)| Op::EndSession { owner, session }),
        1 => (0..2u8, 0..12u8).prop_map(|(owner, n)| Op::Remove { owner, n }),
        1 => (0..2u8, 0..12u8).prop_map(|(owner, n)| Op::Discard { owner, n }),
    ]
}

fn owner(n: u8) -> &'static str {
    ["a", "b"][n as usize % 2]
}

proptest! {
    /// Whatever happens, each tier's use is the sum of its entries and within its
    /// budget, a pinned object is only dropped by its scope ending or a discard, and a
    /// failed admission changes nothing.
    #[test]
    fn accounting_holds(ops in proptest::collection::vec(op(), 1..120)) {
        let mut c = cache(200, 300);
        let mut held: Vec<(ObjectKey, u64)> = Vec::new();
        for (tick, op) in ops.into_iter().enumerate() {
            let now = tick as Tick;
            match op {
                Op::Admit { owner: o, n, size, pinned, session } => {
                    let scope = if session == 0 {
                        ObjectScope::Kept
                    } else {
                        ObjectScope::Session(SessionId(u64::from(session)))
                    };
                    let before = c.usage();
                    match c.admit(key(owner(o), n), size, scope, pinned, now) {
                        Ok(a) => {
                            for d in &a.dropped {
                                prop_assert_eq!(&d.reason, &DropReason::Evicted);
                            }
                            held.push((key(owner(o), n), a.generation));
                        }
                        Err(_) => prop_assert_eq!(before, c.usage()),
                    }
                }
                Op::Open { owner: o, n } => {
                    if let Some(g) = c.open(&key(owner(o), n), now) {
                        held.push((key(owner(o), n), g));
                    }
                }
                Op::Release { which } => {
                    if !held.is_empty() {
                        let (k, g) = held.remove(which % held.len());
                        c.release(&k, g);
                    }
                }
                Op::EndSession { owner: o, session } => {
                    c.end_session(owner(o), SessionId(u64::from(session)));
                }
                Op::Remove { owner: o, n } => {
                    c.remove(&key(owner(o), n), DropReason::Removed);
                }
                Op::Discard { owner: o, n } => {
                    let k = key(owner(o), n);
                    if let Some(g) = c.get(&k).map(|e| e.generation) {
                        c.discard(&k, g, DropReason::Failed("test".into()));
                    }
                }
            }
            if let Err(e) = c.check() {
                prop_assert!(false, "{}", e);
            }
        }
    }
}
