//! The object-store log against a real etcd and a real SeaweedFS, both started by each test
//! (the fixtures of `crates/etcd/tests` and `crates/objstore/tests`, shared, not copied).

#[path = "../../etcd/tests/support/mod.rs"]
mod etcd_support;
#[path = "../../objstore/tests/common/mod.rs"]
mod s3_support;

use std::collections::HashSet;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use etcd_support::{wait_until, Etcd, Proxy};
use meridian_etcd::{Acquire, ClientOptions, Cluster, Ownership, Session, SessionOptions};
use meridian_objlog::{
    keys, Entry, ObjectLog, ObjectLogConfig, ObjectLogError, ObjectRef, PendingAppend, Position,
    TopicLog,
};
use s3_support::Weed;

const BUNDLE_1: &str = "t/ns/0x00000000_0x80000000";
const BUNDLE_2: &str = "t/ns/0x80000000_0xffffffff";

/// A real etcd and a real SeaweedFS; `None` when the tests are skipped.
fn servers() -> Option<(Etcd, Weed)> {
    let etcd = Etcd::start()?;
    let weed = Weed::start()?;
    Some((etcd, weed))
}

/// A real etcd and SeaweedFS, and broker `b1`'s session (lease TTL `ttl_seconds`) owning
/// [`BUNDLE_1`]; `None` when the tests are skipped.
struct Broker {
    etcd: Etcd,
    weed: Weed,
    cluster: Cluster,
    session: Arc<Session>,
    ownership: Ownership,
}

fn one_broker(ttl_seconds: u64) -> Option<Broker> {
    let (etcd, weed) = servers()?;
    let cluster = cluster(&etcd.url());
    let session = session(&cluster, "b1", ttl_seconds);
    let ownership = acquire(&session, BUNDLE_1);
    Some(Broker {
        etcd,
        weed,
        cluster,
        session,
        ownership,
    })
}

impl Broker {
    fn engine(&self, configure: impl FnOnce(&mut ObjectLogConfig)) -> ObjectLog {
        engine(&self.cluster, &self.session, &self.weed, configure)
    }
}

fn cluster(url: &str) -> Cluster {
    Cluster::connect(url, "test", ClientOptions::default()).expect("connect")
}

fn session(cluster: &Cluster, broker_id: &str, ttl_seconds: u64) -> Arc<Session> {
    let options = SessionOptions {
        ttl: Duration::from_secs(ttl_seconds),
        keepalive_interval: None,
    };
    Arc::new(
        cluster
            .start_session(broker_id, broker_id.as_bytes(), options)
            .expect("start session"),
    )
}

fn acquire(session: &Session, bundle: &str) -> Ownership {
    match session.try_acquire(bundle).expect("acquire") {
        Acquire::Acquired(ownership) => ownership,
        Acquire::Owned(owner) => panic!("{bundle} is owned by {owner:?}"),
    }
}

fn engine(
    cluster: &Cluster,
    session: &Arc<Session>,
    weed: &Weed,
    configure: impl FnOnce(&mut ObjectLogConfig),
) -> ObjectLog {
    let mut config = ObjectLogConfig::new(session.broker_id());
    configure(&mut config);
    ObjectLog::start(
        config,
        cluster.clone(),
        session.clone(),
        Arc::new(weed.store()),
    )
    .expect("start engine")
}

fn payload(topic: &str, index: usize) -> Bytes {
    // Sizes vary so that a misplaced offset cannot go unnoticed.
    let mut data = format!("{topic}#{index}#").into_bytes();
    data.resize(data.len() + (index * 37) % 300, b'x');
    Bytes::from(data)
}

fn read_all(topic: &TopicLog) -> Vec<Entry> {
    topic
        .read_from(Position::new(0, 0), usize::MAX, usize::MAX)
        .expect("read")
}

/// What one appending thread saw: acknowledged (position, data), then the first failure.
struct Appended {
    acknowledged: Vec<(Position, Bytes)>,
    failed: Vec<(Bytes, ObjectLogError)>,
}

/// Bounds a load thread, so that an outage that never fails an append fails the test instead
/// of hanging it.
const MAX_LOAD_APPENDS: usize = 5_000;

/// Appends to `topic` one entry after another, each awaited, until `stop_after_failures`
/// appends failed (or [`MAX_LOAD_APPENDS`] were made).
fn append_until_failures(topic: Arc<TopicLog>, stop_after_failures: usize) -> JoinHandle<Appended> {
    std::thread::spawn(move || {
        let mut appended = Appended {
            acknowledged: Vec::new(),
            failed: Vec::new(),
        };
        for index in 0..MAX_LOAD_APPENDS {
            let data = payload(topic.name(), index);
            match topic
                .append(data.clone(), index as u64)
                .and_then(PendingAppend::wait)
            {
                Ok(position) => appended.acknowledged.push((position, data)),
                Err(error) => {
                    appended.failed.push((data, error));
                    if appended.failed.len() >= stop_after_failures {
                        break;
                    }
                }
            }
        }
        appended
    })
}

/// Every acknowledged entry is read back identical at its position, and no entry whose
/// append failed with `not_stored` is there.
fn check_history(
    entries: &[Entry],
    appended: &Appended,
    not_stored: impl Fn(&ObjectLogError) -> bool,
) {
    for (position, data) in &appended.acknowledged {
        let found = entries
            .iter()
            .find(|entry| entry.position == *position)
            .unwrap_or_else(|| panic!("acknowledged entry {position} is missing"));
        assert_eq!(&found.data, data, "entry {position} differs");
    }
    let stored: HashSet<&Bytes> = entries.iter().map(|entry| &entry.data).collect();
    for (data, error) in &appended.failed {
        if not_stored(error) {
            assert!(
                !stored.contains(data),
                "an append that failed ({error}) is readable"
            );
        }
    }
    // Entry ids run without a gap.
    for (index, entry) in entries.iter().enumerate() {
        assert_eq!(entry.position.entry_id, index as u64);
    }
}

#[test]
fn appends_of_three_topics_in_two_bundles_commit_in_order_and_read_back_after_reopening() {
    let Some(Broker {
        etcd: _etcd,
        weed,
        cluster,
        session,
        ownership: bundle_1,
    }) = one_broker(10)
    else {
        return;
    };
    let bundle_2 = acquire(&session, BUNDLE_2);
    let topics = [
        ("persistent://t/ns/a", &bundle_1),
        ("persistent://t/ns/b", &bundle_1),
        ("persistent://t/ns/c", &bundle_2),
    ];
    const PER_TOPIC: usize = 400;

    let written: Vec<Vec<Entry>> = {
        // Small objects, so that the entries spread over many objects and commits.
        let engine = engine(&cluster, &session, &weed, |config| {
            config.max_object_bytes = 16 * 1024;
        });
        let logs: Vec<Arc<TopicLog>> = topics
            .iter()
            .map(|(name, ownership)| engine.open_topic(name, ownership).expect("open"))
            .collect();
        // Interleaved appends, none awaited until all are in.
        let mut pending: Vec<Vec<PendingAppend>> = logs.iter().map(|_| Vec::new()).collect();
        for index in 0..PER_TOPIC {
            for (log, pending) in logs.iter().zip(&mut pending) {
                let data = payload(log.name(), index);
                pending.push(log.append(data, 1_000 + index as u64).expect("append"));
            }
        }
        for (log, pending) in logs.iter().zip(pending) {
            for (index, append) in pending.into_iter().enumerate() {
                // Positions are handed out in append order, and each resolves to its own.
                let expected = Position::new(log.current_ledger_id(), index as u64);
                assert_eq!(append.position(), expected);
                assert_eq!(append.wait().expect("committed"), expected);
                // Once an append resolved, everything before it is readable.
                assert!(log.last_position() >= Some(expected));
            }
        }
        logs.iter().map(|log| read_all(log)).collect()
    };
    assert_eq!(bundle_1.epoch(), 1);
    for ((name, _), entries) in topics.iter().zip(&written) {
        assert_eq!(
            entries.len(),
            PER_TOPIC,
            "{name}: entries read from the cache"
        );
        for (index, entry) in entries.iter().enumerate() {
            assert_eq!(entry.position, Position::new(1, index as u64));
            assert_eq!(entry.data, payload(name, index));
            assert_eq!(entry.publish_time_ms, 1_000 + index as u64);
        }
    }

    // A fresh engine knows nothing but etcd and the objects.
    let engine = engine(&cluster, &session, &weed, |_| {});
    for ((name, ownership), before) in topics.iter().zip(&written) {
        let log = engine.open_topic(name, ownership).expect("reopen");
        assert_eq!(
            log.last_position(),
            Some(Position::new(1, PER_TOPIC as u64 - 1))
        );
        assert_eq!(&read_all(&log), before, "{name}: read back from objects");
        // A read from the middle, in small steps.
        let middle = log
            .read_from(Position::new(1, 123), 5, usize::MAX)
            .expect("read");
        assert_eq!(middle, before[123..128].to_vec());
        assert_eq!(
            log.read(Position::new(1, 399)).expect("read one"),
            before[399]
        );
        // And appends continue after the last committed entry.
        let next = log.append(payload(name, PER_TOPIC), 1).expect("append");
        assert_eq!(
            next.wait().expect("committed"),
            Position::new(1, PER_TOPIC as u64)
        );
    }
}

#[test]
fn a_commit_of_more_topics_than_one_etcd_transaction_holds_is_split() {
    // etcd accepts 128 operations per transaction; 70 topics of one bundle in one object need
    // 140 puts, so the commit must take two transactions.
    let Some(broker) = one_broker(10) else {
        return;
    };
    const TOPICS: usize = 70;
    const ENTRY_BYTES: usize = 100;
    // The object is flushed exactly when the 70th entry is queued (the size trigger), never by
    // the linger: all 70 topics land in one object.
    let engine = broker.engine(|config| {
        config.linger = Duration::from_secs(600);
        config.max_object_bytes = (TOPICS * ENTRY_BYTES) as u64;
    });
    let logs: Vec<Arc<TopicLog>> = (0..TOPICS)
        .map(|index| {
            let name = format!("persistent://t/ns/many-{index:02}");
            engine.open_topic(&name, &broker.ownership).expect("open")
        })
        .collect();
    let pending: Vec<PendingAppend> = logs
        .iter()
        .map(|log| {
            let data = Bytes::from(vec![b'm'; ENTRY_BYTES]);
            log.append(data, 1).expect("append")
        })
        .collect();
    for append in pending {
        assert_eq!(append.wait().expect("committed"), Position::new(1, 0));
    }
    let client = broker.cluster.client();
    let mut objects = HashSet::new();
    let mut revisions = HashSet::new();
    for log in &logs {
        let reference = client
            .get(&broker.cluster.key(&keys::object_ref_key(log.name(), 0)))
            .expect("read ref")
            .expect("ref exists");
        let reference: ObjectRef = serde_json::from_slice(&reference.value).expect("ref");
        objects.insert(reference.object);
        let head = client
            .get(&broker.cluster.key(&keys::head_key(log.name())))
            .expect("read head")
            .expect("head exists");
        revisions.insert(head.mod_revision);
    }
    assert_eq!(objects.len(), 1, "the 70 topics went into one object");
    assert_eq!(revisions.len(), 2, "committed by two transactions");
}

#[test]
fn appends_beyond_the_pending_limits_fail_at_once_and_the_rest_commit() {
    // Models a store that stops answering (SIGSTOP) while producers keep sending: what waits
    // for commit is bounded per topic and per broker, and the excess is refused, not queued.
    let Some(broker) = one_broker(10) else {
        return;
    };
    let engine = broker.engine(|config| {
        config.max_entry_bytes = 1000;
        config.max_pending_bytes_per_topic = 4000;
        config.max_pending_bytes = 6000;
        config.commit_deadline = Duration::from_secs(120);
    });
    let first = engine
        .open_topic("persistent://t/ns/p1", &broker.ownership)
        .expect("open");
    let second = engine
        .open_topic("persistent://t/ns/p2", &broker.ownership)
        .expect("open");
    let entry = || Bytes::from(vec![b'p'; 1000]);
    broker.weed.pause(true);
    let mut accepted: Vec<PendingAppend> = (0..4)
        .map(|_| first.append(entry(), 1).expect("within the topic's limit"))
        .collect();
    // The next append of a full topic, then of the other topic once the broker is full: both
    // refused at once, naming the limit passed.
    let refuse = |log: &Arc<TopicLog>, scope: &str, limit: u64| {
        let refused = log.append(entry(), 1).expect_err("over a limit");
        let named = matches!(
            &refused,
            ObjectLogError::TooManyPendingBytes { scope: found, limit: found_limit, .. }
                if *found == scope && *found_limit == limit
        );
        assert!(
            named,
            "expected the {scope} limit of {limit}, got {refused}"
        );
    };
    refuse(&first, "in this topic", 4000);
    accepted.extend((0..2).map(|_| {
        second
            .append(entry(), 1)
            .expect("within the broker's limit")
    }));
    refuse(&second, "in this broker", 6000);
    assert_eq!(engine.pending_bytes(), 6000);
    broker.weed.pause(false);
    for append in accepted {
        append
            .wait()
            .expect("accepted appends commit once the store answers");
    }
    assert_eq!(engine.pending_bytes(), 0);
    assert_eq!(first.last_position(), Some(Position::new(1, 3)));
    assert_eq!(second.last_position(), Some(Position::new(1, 1)));
    second
        .append(entry(), 1)
        .and_then(PendingAppend::wait)
        .expect("room again");
}

#[test]
fn a_zombie_owner_cannot_commit_and_its_uncommitted_entries_are_never_seen() {
    // Models a broker partitioned from etcd (a network cut): its lease expires, another broker
    // takes the bundle with a higher epoch, then the partition heals while the old owner still
    // holds appends it stored in the object store but could not commit.
    let Some((etcd, weed)) = servers() else {
        return;
    };
    let proxy = Proxy::start(&etcd.address());
    let direct = cluster(&etcd.url());
    let zombie_cluster = cluster(&proxy.url());
    let zombie_session = session(&zombie_cluster, "a", 2);
    let zombie_ownership = acquire(&zombie_session, BUNDLE_1);
    // A long deadline: the zombie keeps retrying through the partition, so what ends its
    // appends is the fence, not the deadline.
    let zombie = engine(&zombie_cluster, &zombie_session, &weed, |config| {
        config.commit_deadline = Duration::from_secs(120);
    });
    let topic = "persistent://t/ns/z";
    let zombie_log = zombie.open_topic(topic, &zombie_ownership).expect("open");
    let committed: Vec<Position> = (0..10)
        .map(|index| {
            zombie_log
                .append(payload("a", index), 1)
                .and_then(PendingAppend::wait)
                .expect("committed before the partition")
        })
        .collect();
    assert_eq!(committed.last(), Some(&Position::new(1, 9)));

    proxy.cut();
    let stranded: Vec<PendingAppend> = (10..15)
        .map(|index| zombie_log.append(payload("a", index), 1).expect("append"))
        .collect();
    // The zombie stored them (a second object appears) but cannot commit them.
    let store = weed.store();
    wait_until("the zombie's second object", || {
        let objects = store.list("test/data/a/", 100).expect("list");
        (objects.len() >= 2).then_some(())
    });
    wait_until("the zombie's lease to expire", || {
        direct
            .owner(BUNDLE_1)
            .expect("owner")
            .is_none()
            .then_some(())
    });

    let new_session = session(&direct, "b", 10);
    let new_ownership = acquire(&new_session, BUNDLE_1);
    assert_eq!(new_ownership.epoch(), 2);
    let new_owner = engine(&direct, &new_session, &weed, |_| {});
    let new_log = new_owner.open_topic(topic, &new_ownership).expect("open");
    assert_eq!(new_log.last_position(), Some(Position::new(1, 9)));
    assert_eq!(new_log.end_position(), Position::new(2, 10));
    for index in 0..3 {
        let position = new_log
            .append(payload("b", index), 1)
            .and_then(PendingAppend::wait)
            .expect("new owner commits");
        assert_eq!(position, Position::new(2, 10 + index as u64));
    }

    proxy.heal();
    for append in stranded {
        let error = append.wait().expect_err("a zombie's append succeeded");
        assert!(
            matches!(error, ObjectLogError::NotOwner { .. }),
            "expected not-owner, got {error}"
        );
    }
    assert!(!zombie_log.is_owner());
    let later = zombie_log
        .append(payload("a", 99), 1)
        .and_then(PendingAppend::wait);
    assert!(
        matches!(later, Err(ObjectLogError::NotOwner { .. })),
        "a zombie append after the fence: {later:?}"
    );

    // The new owner's history: the zombie's 10 committed entries, then its own 3.
    let history = read_all(&new_log);
    let expected: Vec<(Position, Bytes)> = (0..10)
        .map(|index| (Position::new(1, index), payload("a", index as usize)))
        .chain((0..3).map(|index| (Position::new(2, 10 + index), payload("b", index as usize))))
        .collect();
    let found: Vec<(Position, Bytes)> = history
        .into_iter()
        .map(|entry| (entry.position, entry.data))
        .collect();
    assert_eq!(found, expected);
    // A fresh reader sees the same (from objects only).
    drop(new_owner);
    let reader = engine(&direct, &new_session, &weed, |_| {});
    let reopened = reader.open_topic(topic, &new_ownership).expect("reopen");
    let reread: Vec<(Position, Bytes)> = read_all(&reopened)
        .into_iter()
        .map(|entry| (entry.position, entry.data))
        .collect();
    assert_eq!(reread, expected);
}

/// Which server an outage test kills.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outage {
    ObjectStore,
    Etcd,
}

/// Two topics append one entry after another (each awaited) while `outage` kills a server
/// (kill -9) and restarts it on its data directory. Every append that was acknowledged must be
/// read back identical by a fresh engine; appends during the outage must fail with a clear
/// error after the commit deadline, and appends must work again afterwards.
fn outage_under_load(outage: Outage) {
    // A TTL longer than the outage: the broker keeps its bundle through it.
    let Some(Broker {
        mut etcd,
        mut weed,
        cluster,
        session,
        ownership,
    }) = one_broker(30)
    else {
        return;
    };
    let writer = engine(&cluster, &session, &weed, |config| {
        config.commit_deadline = Duration::from_millis(1500);
        config.retry_pause = Duration::from_millis(50);
    });
    let load: Vec<(Arc<TopicLog>, JoinHandle<Appended>)> =
        ["persistent://t/ns/load-1", "persistent://t/ns/load-2"]
            .iter()
            .map(|name| {
                let log = writer.open_topic(name, &ownership).expect("open");
                (log.clone(), append_until_failures(log, 1))
            })
            .collect();
    wait_until("acknowledged appends", || {
        load.iter()
            .all(|(log, _)| log.last_position() >= Some(Position::new(1, 20)))
            .then_some(())
    });
    match outage {
        Outage::ObjectStore => weed.kill(),
        Outage::Etcd => etcd.kill(),
    }
    let results: Vec<(Arc<TopicLog>, Appended)> = load
        .into_iter()
        .map(|(log, thread)| (log, thread.join().expect("append thread")))
        .collect();
    for (log, appended) in &results {
        let Some((_, error)) = appended.failed.first() else {
            panic!("{}: no append failed during the outage", log.name());
        };
        // Killed mid-commit, etcd may have applied the last transaction without answering:
        // then the outcome is reported unknown.
        let expected = match outage {
            Outage::ObjectStore => matches!(
                error,
                ObjectLogError::Unavailable {
                    operation: "object store PUT",
                    ..
                }
            ),
            Outage::Etcd => matches!(
                error,
                ObjectLogError::Unavailable {
                    operation: "etcd commit",
                    ..
                } | ObjectLogError::CommitUncertain { .. }
            ),
        };
        assert!(expected, "{}: unexpected error {error}", log.name());
    }
    match outage {
        Outage::ObjectStore => weed.launch(),
        Outage::Etcd => etcd.restart(),
    }
    if outage == Outage::ObjectStore {
        // Not fenced nor uncertain: the same topics take appends again. The store just
        // relaunched may still be slow to answer on a busy machine: an append may fail as
        // unavailable (past its deadline) until it does, but with nothing else.
        for (log, _) in &results {
            wait_until("appends to resume after the outage", || {
                match log
                    .append(Bytes::from_static(b"resumed"), 1)
                    .and_then(PendingAppend::wait)
                {
                    Ok(position) => Some(position),
                    Err(ObjectLogError::Unavailable { .. }) => None,
                    Err(error) => panic!("{}: appends do not resume: {error}", log.name()),
                }
            });
        }
    }
    drop(writer);
    let reader = engine(&cluster, &session, &weed, |_| {});
    for (log, appended) in &results {
        let reopened = reader.open_topic(log.name(), &ownership).expect("reopen");
        let entries = read_all(&reopened);
        // An append whose outcome was unknown may have been committed; no other failed one
        // may be there.
        check_history(&entries, appended, |error| {
            !matches!(error, ObjectLogError::CommitUncertain { .. })
        });
        let next = reopened
            .append(Bytes::from_static(b"after"), 1)
            .and_then(PendingAppend::wait)
            .expect("appends work after reopening");
        assert_eq!(next.entry_id, entries.len() as u64);
    }
}

#[test]
fn an_object_store_outage_fails_appends_after_the_deadline_and_loses_nothing_acknowledged() {
    outage_under_load(Outage::ObjectStore);
}

#[test]
fn an_etcd_outage_fails_appends_after_the_deadline_and_loses_nothing_acknowledged() {
    outage_under_load(Outage::Etcd);
}

#[test]
fn a_commit_against_a_hanging_store_fails_within_its_deadline() {
    // Models a store that accepts connections and never answers (SIGSTOP), with an S3 client
    // whose request timeout (10 minutes here) is far beyond the commit deadline (1 s): each
    // PUT attempt must be cut at what is left of the deadline, so that the append fails as
    // `Unavailable` once the deadline passes. Before, one attempt waited for the whole request
    // timeout (the append did not return within `wait_until`'s bound).
    let Some(broker) = one_broker(30) else {
        return;
    };
    let mut store_config = broker.weed.config("test", s3_support::SECRET_ACCESS_KEY);
    store_config.request_timeout = Duration::from_secs(600);
    let mut config = ObjectLogConfig::new(broker.session.broker_id());
    config.commit_deadline = Duration::from_secs(1);
    config.retry_pause = Duration::from_millis(50);
    let engine = ObjectLog::start(
        config,
        broker.cluster.clone(),
        broker.session.clone(),
        Arc::new(meridian_objstore::ObjectStore::new(&store_config).expect("store")),
    )
    .expect("start engine");
    let log = engine
        .open_topic("persistent://t/ns/hanging", &broker.ownership)
        .expect("open");
    broker.weed.pause(true);
    let pending = log
        .append(Bytes::from_static(b"held"), 1)
        .expect("accepted");
    let waiting = std::thread::spawn(move || pending.wait());
    wait_until("the append to return", || {
        waiting.is_finished().then_some(())
    });
    broker.weed.pause(false);
    let error = waiting
        .join()
        .expect("append thread")
        .expect_err("no store answered");
    assert!(
        matches!(
            error,
            ObjectLogError::Unavailable {
                operation: "object store PUT",
                ..
            }
        ),
        "unexpected error {error}"
    );
}

/// The keys etcd holds under `logs/<topic>/` (the head and the `objects/` keys).
fn index_keys_in_etcd(cluster: &Cluster, topic: &str) -> Vec<String> {
    let mut found = Vec::new();
    cluster
        .client()
        .scan_prefix(
            &cluster.key(&format!("logs/{topic}/")),
            1000,
            true,
            |page| {
                found.extend(page.iter().map(|kv| kv.key.clone()));
            },
        )
        .expect("scan the index");
    found
}

/// `count` appends to `topic`, each awaited, so each is a commit of its own (one ref each).
fn append_one_by_one(topic: &Arc<TopicLog>, from: usize, count: usize) -> Vec<(Position, Bytes)> {
    (from..from + count)
        .map(|index| {
            let data = payload(topic.name(), index);
            let position = topic
                .append(data.clone(), index as u64)
                .and_then(PendingAppend::wait)
                .expect("committed");
            (position, data)
        })
        .collect()
}

fn entries_as_written(entries: &[Entry]) -> Vec<(Position, Bytes)> {
    entries
        .iter()
        .map(|entry| (entry.position, entry.data.clone()))
        .collect()
}

#[test]
fn index_keys_past_the_threshold_move_into_manifests_and_everything_reads_back() {
    let Some(broker) = one_broker(10) else {
        return;
    };
    let name = "persistent://t/ns/manifested";
    const THRESHOLD: usize = 5;
    let engine = broker.engine(|config| config.manifest_threshold = THRESHOLD);
    let topic = engine.open_topic(name, &broker.ownership).expect("open");
    let written = append_one_by_one(&topic, 0, 23);

    // 23 commits: after the 5th, 10th, 15th and 20th the keys went into a manifest; 3 keys
    // and the head are left (without manifests: 23 keys and the head).
    let keys = index_keys_in_etcd(&broker.cluster, name);
    assert!(
        keys.len() <= THRESHOLD,
        "etcd holds {} keys for the topic: {keys:?}",
        keys.len()
    );
    let manifests = broker
        .weed
        .store()
        .list(&keys::manifests_prefix("test/", name), 100)
        .expect("list manifests");
    assert_eq!(manifests.len(), 4, "{manifests:?}");
    assert_eq!(entries_as_written(&read_all(&topic)), written);
    drop(topic);
    drop(engine);

    // A fresh engine (a new owner's, or a reload's) reads the chain of manifests and the
    // keys as one index: every entry in order, from the start and from the middle.
    let engine = broker.engine(|config| config.manifest_threshold = THRESHOLD);
    let topic = engine.open_topic(name, &broker.ownership).expect("reopen");
    assert_eq!(topic.last_position(), Some(written[22].0));
    assert_eq!(entries_as_written(&read_all(&topic)), written);
    let middle = topic
        .read_from(written[7].0, 9, usize::MAX)
        .expect("read from the middle");
    assert_eq!(entries_as_written(&middle), written[7..16].to_vec());
    // Appends continue after the last entry, and compaction goes on from the chain.
    let more = append_one_by_one(&topic, 23, 2);
    assert_eq!(more[0].0, Position::new(1, 23));
    // The flusher compacts right after the commit that reached the threshold.
    wait_until("the 5th key since the last manifest to move", || {
        (topic.index_keys() == 0).then_some(())
    });
    assert_eq!(
        broker
            .weed
            .store()
            .list(&keys::manifests_prefix("test/", name), 100)
            .expect("list manifests")
            .len(),
        5
    );
    drop(topic);
    drop(engine);
    let engine = broker.engine(|_| {});
    let topic = engine.open_topic(name, &broker.ownership).expect("reopen");
    let everything: Vec<(Position, Bytes)> = written.into_iter().chain(more).collect();
    assert_eq!(entries_as_written(&read_all(&topic)), everything);
}

#[test]
fn a_fenced_owner_cannot_compact_and_changes_nothing_in_etcd() {
    let Some(broker) = one_broker(10) else {
        return;
    };
    let name = "persistent://t/ns/fenced-compaction";
    // Manifests off, so that only the explicit compaction below could write one.
    let engine_a = broker.engine(|config| config.manifest_threshold = 0);
    let topic = engine_a.open_topic(name, &broker.ownership).expect("open");
    let written = append_one_by_one(&topic, 0, 6);
    let head_key = broker.cluster.key(&keys::head_key(name));
    let head_before = broker
        .cluster
        .client()
        .get(&head_key)
        .expect("read the head")
        .expect("a head");
    let keys_before = index_keys_in_etcd(&broker.cluster, name);
    assert_eq!(keys_before.len(), 7);

    // The bundle moves behind the owner's back (an operator deletes its owner key) and
    // broker b2 takes it with epoch 2.
    let owner_key = broker.cluster.key(&format!("owners/{BUNDLE_1}"));
    broker
        .cluster
        .client()
        .txn(&[], &[meridian_etcd::Op::Delete(owner_key)], &[])
        .expect("delete the owner key");
    let session_b = session(&broker.cluster, "b2", 10);
    let ownership_b = acquire(&session_b, BUNDLE_1);
    assert_eq!(ownership_b.epoch(), 2);

    let error = topic.compact().expect_err("a fenced compaction");
    assert!(matches!(error, ObjectLogError::NotOwner { .. }), "{error}");
    let head_after = broker
        .cluster
        .client()
        .get(&head_key)
        .expect("read the head")
        .expect("a head");
    assert_eq!(head_after, head_before, "the head did not change");
    assert_eq!(index_keys_in_etcd(&broker.cluster, name), keys_before);
    assert!(!topic.is_owner());

    // The new owner reads the 6 entries from the keys, and can compact them itself.
    let engine_b = engine(&broker.cluster, &session_b, &broker.weed, |config| {
        config.manifest_threshold = 0;
    });
    let topic_b = engine_b.open_topic(name, &ownership_b).expect("open at b2");
    assert_eq!(entries_as_written(&read_all(&topic_b)), written);
    let manifest = topic_b.compact().expect("compact").expect("a manifest");
    assert_eq!((manifest.first_entry, manifest.last_entry), (0, 5));
    assert_eq!(index_keys_in_etcd(&broker.cluster, name).len(), 1);
}

/// The keys of the objects under `prefix`, with their age by the store's clock.
fn objects_under(weed: &Weed, prefix: &str) -> Vec<(String, u64)> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    weed.store()
        .list(prefix, 10_000)
        .expect("list")
        .into_iter()
        .map(|object| {
            let stored = object.last_modified_ms.expect("a LastModified time");
            (object.key, now_ms.saturating_sub(stored))
        })
        .collect()
}

/// Settings for the sweep tests: manifests past `threshold` keys, a grace period of one second
/// (a commit deadline of half that), sweeps only when asked.
fn sweeping_quickly(threshold: usize) -> impl Fn(&mut ObjectLogConfig) + Copy {
    move |config: &mut ObjectLogConfig| {
        config.manifest_threshold = threshold;
        config.commit_deadline = Duration::from_millis(500);
        config.orphan_grace = Duration::from_secs(1);
        config.sweep_interval = None;
    }
}

#[test]
fn the_orphan_sweep_deletes_only_old_objects_no_index_references() {
    let Some(broker) = one_broker(10) else {
        return;
    };
    let configure = sweeping_quickly(3);
    let engine = broker.engine(configure);
    let open = |name: &str| engine.open_topic(name, &broker.ownership).expect("open");
    let (a, b, c) = (
        open("persistent://t/ns/a"),
        open("persistent://t/ns/b"),
        open("persistent://t/ns/c"),
    );
    // a: 7 commits of its own (two manifests of 3 refs, one key left).
    let mut written_a = append_one_by_one(&a, 0, 7);
    // One object shared by a and b: b's index will be deleted, a's still references it.
    let shared_a = a.append(payload(a.name(), 7), 7).expect("append");
    let shared_b = b.append(payload(b.name(), 0), 0).expect("append");
    written_a.push((shared_a.wait().expect("committed"), payload(a.name(), 7)));
    shared_b.wait().expect("committed");
    // c: 2 commits of its own, then c and b are deleted (their index, as a topic deletion
    // does): c's objects are orphans, the shared one is not.
    append_one_by_one(&c, 0, 2);
    engine.close_topic(b.name());
    engine.close_topic(c.name());
    let root_prefix = |topic: &str| broker.cluster.key(&format!("logs/{topic}/"));
    for topic in [b.name(), c.name()] {
        let from = root_prefix(topic);
        let to = format!("{}0", from.trim_end_matches('/'));
        broker
            .cluster
            .client()
            .txn(&[], &[meridian_etcd::Op::DeleteRange { from, to }], &[])
            .expect("delete the index");
    }
    // What a crash between a PUT and its transaction leaves: a data object and a manifest
    // that nothing references.
    let store = broker.weed.store();
    let orphan_data = "test/data/b9/00000000000000000001/00000000000000000001.seg";
    let orphan_manifest = keys::manifest_key("test/", a.name(), (0, 2), 1, 42);
    store.put(orphan_data, b"crashed commit").expect("put");
    store.put(&orphan_manifest, b"{}").expect("put");
    let data_before = objects_under(&broker.weed, "test/data/");
    let manifests_before = objects_under(&broker.weed, "test/manifests/");
    assert_eq!(data_before.len(), 7 + 1 + 2 + 1, "{data_before:?}");
    assert_eq!(manifests_before.len(), 2 + 1, "{manifests_before:?}");

    // Everything so far is older than the grace period once a second passed; then one more
    // orphan arrives, young: it may belong to a commit under way, so it stays.
    wait_until("every object to be older than the grace period", || {
        objects_under(&broker.weed, "test/")
            .iter()
            .all(|(_, age_ms)| *age_ms > 1_000)
            .then_some(())
    });
    let young = "test/data/b9/00000000000000000001/00000000000000000002.seg";
    store.put(young, b"commit under way").expect("put");

    let report = engine.sweep().expect("sweep");
    assert!(report.swept);
    assert_eq!(report.data_objects_deleted, 2 + 1, "{report:?}");
    assert_eq!(report.manifests_deleted, 1, "{report:?}");
    assert_eq!(report.young_kept, 1, "{report:?}");
    let data_after: HashSet<String> = objects_under(&broker.weed, "test/data/")
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    assert!(!data_after.contains(orphan_data));
    assert!(data_after.contains(young));
    assert_eq!(
        data_after.len(),
        7 + 1 + 1,
        "a's objects, the shared one, the young one"
    );
    let manifests_after = objects_under(&broker.weed, "test/manifests/");
    assert_eq!(manifests_after.len(), 2);
    assert!(manifests_after
        .iter()
        .all(|(key, _)| *key != orphan_manifest));

    // Nothing referenced went: a fresh engine reads all of a back, the shared entry too.
    drop(a);
    drop(engine);
    let engine = broker.engine(configure);
    let a = engine
        .open_topic("persistent://t/ns/a", &broker.ownership)
        .expect("reopen");
    assert_eq!(entries_as_written(&read_all(&a)), written_a);

    // One broker sweeps at a time: b2 finds the sweeper key held by b1's lease.
    let session_b = session(&broker.cluster, "b2", 10);
    let engine_b = engine_of(&broker, &session_b, configure);
    assert!(!engine_b.sweep().expect("sweep at b2").swept);
}

fn engine_of(
    broker: &Broker,
    session: &Arc<Session>,
    configure: impl FnOnce(&mut ObjectLogConfig),
) -> ObjectLog {
    engine(&broker.cluster, session, &broker.weed, configure)
}

#[test]
fn trimmed_entries_leave_the_index_and_the_rest_reads_back() {
    let Some(broker) = one_broker(10) else {
        return;
    };
    let name = "persistent://t/ns/trimmed";
    let configure = sweeping_quickly(4);
    let engine = broker.engine(configure);
    let topic = engine.open_topic(name, &broker.ownership).expect("open");
    // 10 commits: manifests of entries 0-3 and 4-7, keys of 8 and 9.
    let written = append_one_by_one(&topic, 0, 10);
    wait_until("two manifests", || (topic.index_keys() == 2).then_some(()));

    // The local log trimmed everything before entry 5: refs 0-4 leave the index; the newest
    // manifest still holds 5-7, so the chain stays (its older manifest is no longer read).
    topic.request_trim(5);
    wait_until("the trim to entry 5", || {
        (topic.first_entry() == 5).then_some(())
    });
    assert_eq!(entries_as_written(&read_all(&topic)), written[5..].to_vec());

    // The sweep deletes what the trim left unreferenced: the manifest of 0-3 and the data
    // objects of entries 0-4 (one commit each), once older than the grace period.
    wait_until("every object to be older than the grace period", || {
        objects_under(&broker.weed, "test/")
            .iter()
            .all(|(_, age_ms)| *age_ms > 1_000)
            .then_some(())
    });
    let report = engine.sweep().expect("sweep");
    assert_eq!(
        (report.data_objects_deleted, report.manifests_deleted),
        (5, 1),
        "{report:?}"
    );

    // A new owner (a fresh engine) copies only what is left, entry 5 on.
    drop(topic);
    drop(engine);
    let engine = broker.engine(configure);
    let topic = engine.open_topic(name, &broker.ownership).expect("reopen");
    assert_eq!(topic.first_entry(), 5);
    assert_eq!(entries_as_written(&read_all(&topic)), written[5..].to_vec());

    // Trimmed to entry 9: the chain goes, so does the key of entry 8.
    topic.request_trim(9);
    wait_until("the trim to entry 9", || {
        (topic.first_entry() == 9).then_some(())
    });
    let keys = index_keys_in_etcd(&broker.cluster, name);
    assert_eq!(keys.len(), 2, "the head and the key of entry 9: {keys:?}");
    drop(topic);
    drop(engine);
    let engine = broker.engine(configure);
    let topic = engine.open_topic(name, &broker.ownership).expect("reopen");
    assert_eq!(entries_as_written(&read_all(&topic)), written[9..].to_vec());
    let next = append_one_by_one(&topic, 10, 1);
    assert_eq!(next[0].0, Position::new(1, 10));
}
