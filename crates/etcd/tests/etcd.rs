//! The etcd half of cluster mode against a real etcd server (Debian `etcd-server`, `ETCD_BIN`):
//! the metadata store, broker sessions on leases, bundle ownership and fenced commits.

mod support;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use meridian_etcd::{
    Acquire, ClientOptions, Cluster, Compare, EtcdError, KeyValue, LeaseLost, Op, OwnerRecord,
    Session, SessionOptions,
};
use meridian_metadata::{Change, ExpectedVersion, MetadataError, MetadataStore};
use support::{wait_until, Etcd, Proxy, WAIT};
use tokio::sync::{broadcast, watch};

fn cluster(url: &str) -> Cluster {
    Cluster::connect(url, "test", ClientOptions::default()).expect("connect")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
}

/// The next change a watcher sees (fails the test after [`WAIT`]).
fn next_change(changes: &mut broadcast::Receiver<Change>) -> Change {
    runtime()
        .block_on(async { tokio::time::timeout(WAIT, changes.recv()).await })
        .expect("timed out waiting for a metadata change")
        .expect("watch channel")
}

/// Waits until the session's lease-lost signal fires and returns its reason.
fn wait_lost(lost: &mut watch::Receiver<Option<LeaseLost>>) -> LeaseLost {
    runtime()
        .block_on(async {
            let reason = tokio::time::timeout(WAIT, lost.wait_for(Option::is_some)).await;
            reason.map(|reason| reason.map(|reason| reason.clone()))
        })
        .expect("timed out waiting for the lease-lost signal")
        .expect("lost channel")
        .expect("a reason")
}

/// A session whose lease expires `ttl_seconds` after it stops renewing. Tests that do not wait
/// for an expiry use 10 s, so that a busy machine cannot make them lose their lease.
fn session(cluster: &Cluster, broker_id: &str, ttl_seconds: u64) -> Session {
    cluster
        .start_session(
            broker_id,
            format!("pulsar://{broker_id}:6650").as_bytes(),
            SessionOptions {
                ttl: Duration::from_secs(ttl_seconds),
                keepalive_interval: None,
            },
        )
        .expect("start session")
}

fn acquired(outcome: Acquire) -> meridian_etcd::Ownership {
    match outcome {
        Acquire::Acquired(ownership) => ownership,
        Acquire::Owned(owner) => panic!("expected to acquire, but {owner:?} owns the bundle"),
    }
}

fn head(value: &str) -> Op {
    Op::Put {
        key: "logs/t/head".to_string(),
        value: value.as_bytes().to_vec(),
        lease: 0,
    }
}

/// The key `brokers/<broker_id>` a session registered, if it still exists.
fn registration(cluster: &Cluster, broker_id: &str) -> Option<KeyValue> {
    let key = cluster.key(&format!("brokers/{broker_id}"));
    cluster.client().get(&key).expect("get")
}

/// The value of `logs/t/head`, which the tests' commits write.
fn stored_head(cluster: &Cluster) -> Vec<u8> {
    let head = cluster.client().get(&cluster.key("logs/t/head"));
    head.expect("get").expect("a committed head").value
}

#[test]
fn metadata_store_versions_children_and_watch() {
    let Some(etcd) = Etcd::start() else { return };
    let store = cluster(&etcd.url()).metadata_store().expect("store");
    let mut changes = store.watch();

    let first = store
        .put("/a/b", b"1", ExpectedVersion::Absent)
        .expect("create");
    match store.put("/a/b", b"x", ExpectedVersion::Absent) {
        Err(MetadataError::BadVersion { found, .. }) => assert_eq!(found, Some(first)),
        other => panic!("creating an existing key must be refused, got {other:?}"),
    }
    let second = store
        .put("/a/b", b"2", ExpectedVersion::Exactly(first))
        .expect("update at the current version");
    assert!(second > first, "versions grow: {first} then {second}");
    match store.put("/a/b", b"stale", ExpectedVersion::Exactly(first)) {
        Err(MetadataError::BadVersion { found, .. }) => assert_eq!(found, Some(second)),
        other => panic!("a stale expected version must be refused, got {other:?}"),
    }
    assert!(matches!(
        store.delete("/a/b", ExpectedVersion::Exactly(first)),
        Err(MetadataError::BadVersion { .. })
    ));
    let got = store.get("/a/b").expect("get").expect("present");
    assert_eq!((got.value.as_slice(), got.version), (&b"2"[..], second));

    store
        .put("/a/c/d", b"3", ExpectedVersion::Any)
        .expect("put");
    store
        .put("/a/c/e", b"4", ExpectedVersion::Any)
        .expect("put");
    store.put("/ab", b"5", ExpectedVersion::Any).expect("put");
    assert_eq!(store.children("/a").expect("children"), vec!["b", "c"]);
    assert_eq!(store.children("/a/").expect("children"), vec!["b", "c"]);
    assert_eq!(store.children("/a/c").expect("children"), vec!["d", "e"]);
    assert!(store.children("/none").expect("children").is_empty());

    store
        .delete("/a/c/d", ExpectedVersion::Any)
        .expect("delete");
    store
        .delete("/missing", ExpectedVersion::Any)
        .expect("deleting a missing key is not an error");
    assert!(store.get("/a/c/d").expect("get").is_none());

    // The watch reports every write and the delete, in order, with the versions.
    let expected = [
        ("/a/b", Some(first)),
        ("/a/b", Some(second)),
        ("/a/c/d", None),
        ("/a/c/e", None),
        ("/ab", None),
    ];
    for (key, version) in expected {
        let change = next_change(&mut changes);
        assert_eq!(change.key, key);
        assert!(change.version.is_some());
        if version.is_some() {
            assert_eq!(change.version, version);
        }
    }
    assert_eq!(
        next_change(&mut changes),
        Change {
            key: "/a/c/d".to_string(),
            version: None
        }
    );

    // Another cluster's store on the same etcd sees none of it.
    let other = Cluster::connect(&etcd.url(), "other", ClientOptions::default())
        .expect("connect")
        .metadata_store()
        .expect("store");
    assert!(other.get("/a/b").expect("get").is_none());
    assert!(other.children("/a").expect("children").is_empty());
}

#[test]
fn requests_fail_over_to_a_live_endpoint_and_say_when_none_answers() {
    let Some(etcd) = Etcd::start() else { return };
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("port")
        .port();
    let store = cluster(&format!("etcd://127.0.0.1:{dead},{}", etcd.address()))
        .metadata_store()
        .expect("the live endpoint serves");
    let version = store
        .put("/k", b"v", ExpectedVersion::Absent)
        .expect("write through the live endpoint");
    assert_eq!(
        store.get("/k").expect("get").expect("present").version,
        version
    );

    let nowhere = cluster(&format!("etcd://127.0.0.1:{dead}"));
    match nowhere.owner("b") {
        Err(EtcdError::Unavailable { message, .. }) => {
            assert!(message.contains(&dead.to_string()), "{message}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[test]
fn two_sessions_racing_for_a_bundle_exactly_one_wins() {
    let Some(etcd) = Etcd::start() else { return };
    let cluster = cluster(&etcd.url());
    let sessions = [
        Arc::new(session(&cluster, "one", 10)),
        Arc::new(session(&cluster, "two", 10)),
    ];
    let mut first_round = None;
    for round in 0..10 {
        let bundle = format!("public/default/{round}");
        let barrier = Arc::new(Barrier::new(2));
        let racers: Vec<_> = sessions
            .iter()
            .map(|session| {
                let (session, barrier, bundle) = (session.clone(), barrier.clone(), bundle.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    session.try_acquire(&bundle).expect("try_acquire")
                })
            })
            .collect();
        let outcomes: Vec<Acquire> = racers
            .into_iter()
            .map(|racer| racer.join().expect("racer"))
            .collect();
        let winners: Vec<(usize, meridian_etcd::Ownership)> = outcomes
            .iter()
            .enumerate()
            .filter_map(|(index, outcome)| match outcome {
                Acquire::Acquired(ownership) => Some((index, ownership.clone())),
                Acquire::Owned(_) => None,
            })
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {outcomes:?}");
        let (winner, ownership) = winners[0].clone();
        assert_eq!(ownership.epoch(), 1);
        let owner = cluster.owner(&bundle).expect("owner").expect("owned");
        assert_eq!(
            owner,
            OwnerRecord {
                broker_id: sessions[winner].broker_id().to_string(),
                epoch: 1
            }
        );
        assert_eq!(
            outcomes[1 - winner],
            Acquire::Owned(owner),
            "the loser is told who won"
        );
        first_round.get_or_insert((winner, ownership));
    }

    // The winner of the first round releases; the other broker takes the bundle with the next
    // epoch; the old ownership can then neither release nor commit.
    let (winner, old) = first_round.expect("ten rounds");
    let (winner, loser) = (&sessions[winner], &sessions[1 - winner]);
    assert!(matches!(
        winner.try_acquire(old.bundle()).expect("again"),
        Acquire::Owned(_)
    ));
    winner
        .fenced_commit(&old, &[], &[head("old")])
        .expect("the owner commits");
    assert!(winner.release(&old).expect("release"));
    assert_eq!(cluster.owner(old.bundle()).expect("owner"), None);
    let new = acquired(loser.try_acquire(old.bundle()).expect("acquire"));
    assert_eq!(new.epoch(), 2, "epochs never go back");
    assert!(!winner.release(&old).expect("release"), "not ours any more");
    match winner.fenced_commit(&old, &[], &[head("zombie")]) {
        Err(EtcdError::Fenced { epoch, current, .. }) => {
            assert_eq!(epoch, 1);
            assert_eq!(current.map(|owner| owner.epoch), Some(2));
        }
        other => panic!("the old owner's commit must be fenced, got {other:?}"),
    }
    loser
        .fenced_commit(&new, &[], &[head("new")])
        .expect("the new owner commits");
    assert_eq!(stored_head(&cluster), b"new");
}

/// Two brokers take and give up the same bundle over and over, racing: every acquisition gets
/// an epoch no other acquisition got (the epoch key's revision is compared, so a broker that read
/// an old epoch cannot reuse it after someone else took and released the bundle).
#[test]
fn epochs_are_never_handed_out_twice() {
    let Some(etcd) = Etcd::start() else { return };
    let cluster = cluster(&etcd.url());
    let racers: Vec<_> = ["one", "two"]
        .into_iter()
        .map(|broker_id| {
            let session = session(&cluster, broker_id, 10);
            std::thread::spawn(move || {
                let mut epochs = Vec::new();
                for _ in 0..40 {
                    if let Acquire::Acquired(ownership) =
                        session.try_acquire("ns/0").expect("try_acquire")
                    {
                        epochs.push(ownership.epoch());
                        assert!(session.release(&ownership).expect("release"));
                    }
                }
                epochs
            })
        })
        .collect();
    let mut epochs: Vec<u64> = racers
        .into_iter()
        .flat_map(|racer| racer.join().expect("racer"))
        .collect();
    let acquisitions = epochs.len();
    epochs.sort_unstable();
    epochs.dedup();
    assert_eq!(epochs.len(), acquisitions, "an epoch was handed out twice");
    let last = cluster
        .client()
        .get(&cluster.key("epochs/ns/0"))
        .expect("get");
    assert_eq!(
        last.expect("epoch key").value,
        acquisitions.to_string().into_bytes()
    );
}

/// Models a broker cut off from etcd (network partition, or a process paused past its TTL): it
/// cannot renew, learns that its lease is lost, etcd deletes its owner key, another broker takes
/// the bundle with the next epoch, and when the old owner is reachable again its commit is
/// refused by etcd itself.
#[test]
fn an_unrenewed_lease_moves_the_bundle_and_fences_the_old_owner() {
    let Some(etcd) = Etcd::start() else { return };
    let proxy = Proxy::start(&etcd.address());
    let direct = cluster(&etcd.url());
    let old = session(&cluster(&proxy.url()), "old", 3);
    let new = session(&direct, "new", 10);
    let mut lost = old.lost();
    let bundle = "public/default/0x00000000_0x40000000";
    let ownership = acquired(old.try_acquire(bundle).expect("acquire"));
    assert_eq!(ownership.epoch(), 1);
    assert!(matches!(
        new.try_acquire(bundle).expect("try"),
        Acquire::Owned(OwnerRecord { epoch: 1, .. })
    ));
    let committed = old
        .fenced_commit(
            &ownership,
            &[Compare::Absent("logs/t/head".to_string())],
            &[head("1")],
        )
        .expect("the owner commits");
    // A compare of the caller that fails while the ownership holds is named as such.
    match old.fenced_commit(
        &ownership,
        &[Compare::ModRevision(
            "logs/t/head".to_string(),
            committed - 1,
        )],
        &[head("2")],
    ) {
        Err(EtcdError::CompareFailed { key, .. }) => assert!(key.ends_with("logs/t/head"), "{key}"),
        other => panic!("a stale head compare must fail, got {other:?}"),
    }

    proxy.cut();
    assert_eq!(
        wait_lost(&mut lost),
        LeaseLost::NotRenewed { ttl: old.ttl() }
    );
    assert!(!old.is_alive());
    wait_until("etcd to expire the old owner's lease", || {
        direct.owner(bundle).expect("owner").is_none().then_some(())
    });
    assert_eq!(registration(&direct, "old"), None);
    let taken = acquired(new.try_acquire(bundle).expect("acquire"));
    assert_eq!(taken.epoch(), 2);

    // The partition heals; the old owner, not yet acting on the signal, tries to commit.
    proxy.heal();
    match old.fenced_commit(&ownership, &[], &[head("zombie")]) {
        Err(EtcdError::Fenced { epoch, current, .. }) => {
            assert_eq!(epoch, 1);
            assert_eq!(
                current,
                Some(OwnerRecord {
                    broker_id: "new".to_string(),
                    epoch: 2
                })
            );
        }
        other => panic!("the old owner's commit must be refused, got {other:?}"),
    }
    assert!(matches!(
        old.try_acquire("public/default/other"),
        Err(EtcdError::SessionLost { .. })
    ));
    new.fenced_commit(&taken, &[], &[head("3")])
        .expect("the new owner commits");
    assert_eq!(stored_head(&direct), b"3");
}

/// Models an operator (or etcd) revoking a broker's lease: the next keepalive learns it at once.
#[test]
fn a_revoked_lease_is_reported_lost_and_its_keys_are_gone() {
    let Some(etcd) = Etcd::start() else { return };
    let cluster = cluster(&etcd.url());
    let session = cluster
        .start_session(
            "b1",
            b"pulsar://b1:6650",
            SessionOptions {
                ttl: Duration::from_secs(60),
                keepalive_interval: Some(Duration::from_millis(200)),
            },
        )
        .expect("session");
    let mut lost = session.lost();
    acquired(session.try_acquire("ns/0").expect("acquire"));
    assert!(matches!(
        cluster.start_session("b1", b"again", SessionOptions::default()),
        Err(EtcdError::AlreadyRegistered { .. })
    ));
    wait_until("a renewal", || (session.renewals() > 0).then_some(()));

    cluster
        .client()
        .lease_revoke(session.lease_id())
        .expect("revoke");
    assert_eq!(wait_lost(&mut lost), LeaseLost::Expired);
    assert_eq!(cluster.owner("ns/0").expect("owner"), None);
    assert_eq!(registration(&cluster, "b1"), None);
    // The id is free again for a new session.
    let again = cluster
        .start_session("b1", b"again", SessionOptions::default())
        .expect("register again");
    again.close().expect("close");
    assert_eq!(registration(&cluster, "b1"), None);
}

/// Models a metadata watcher whose connection to etcd breaks while others keep writing: when it
/// reconnects it resumes from the last revision it saw and reports the changes it missed.
#[test]
fn a_watch_resumes_after_a_broken_connection_without_missing_changes() {
    let Some(etcd) = Etcd::start() else { return };
    let proxy = Proxy::start(&etcd.address());
    let watched = cluster(&proxy.url()).metadata_store().expect("store");
    let writer = cluster(&etcd.url()).metadata_store().expect("store");
    let mut changes = watched.watch();
    let first = writer
        .put("/k1", b"1", ExpectedVersion::Absent)
        .expect("put");
    assert_eq!(
        next_change(&mut changes),
        Change {
            key: "/k1".to_string(),
            version: Some(first)
        }
    );

    proxy.cut();
    let second = writer
        .put("/k2", b"2", ExpectedVersion::Absent)
        .expect("put");
    writer.delete("/k1", ExpectedVersion::Any).expect("delete");
    proxy.heal();

    assert_eq!(
        next_change(&mut changes),
        Change {
            key: "/k2".to_string(),
            version: Some(second)
        }
    );
    assert_eq!(
        next_change(&mut changes),
        Change {
            key: "/k1".to_string(),
            version: None
        }
    );
}

/// Models etcd crashing and restarting on its data directory: keys, versions and a live lease
/// survive, and the store, its watch and the session reconnect by themselves.
#[test]
fn etcd_restart_keeps_keys_and_leases_and_clients_reconnect() {
    let Some(mut etcd) = Etcd::start() else {
        return;
    };
    let cluster = cluster(&etcd.url());
    let store = cluster.metadata_store().expect("store");
    let mut changes = store.watch();
    let version = store
        .put("/tenants/t", b"policies", ExpectedVersion::Absent)
        .expect("put");
    assert_eq!(next_change(&mut changes).key, "/tenants/t");
    // The TTL must outlast the restart: etcd's downtime counts against it on this side.
    let session = cluster
        .start_session(
            "b1",
            b"pulsar://b1:6650",
            SessionOptions {
                ttl: Duration::from_secs(30),
                keepalive_interval: Some(Duration::from_millis(300)),
            },
        )
        .expect("session");
    let ownership = acquired(session.try_acquire("ns/0").expect("acquire"));

    etcd.restart();

    let renewals = session.renewals();
    wait_until("a renewal after the restart", || {
        (session.renewals() > renewals).then_some(())
    });
    assert!(session.is_alive());
    let got = store
        .get("/tenants/t")
        .expect("get after restart")
        .expect("kept");
    assert_eq!(
        (got.value.as_slice(), got.version),
        (&b"policies"[..], version)
    );
    let kept = registration(&cluster, "b1").expect("registration kept");
    assert_eq!(kept.lease, session.lease_id());
    assert_eq!(
        cluster.owner("ns/0").expect("owner"),
        Some(OwnerRecord {
            broker_id: "b1".to_string(),
            epoch: 1
        })
    );
    session
        .fenced_commit(&ownership, &[], &[head("after restart")])
        .expect("commit after restart");
    let next = store
        .put("/tenants/t", b"changed", ExpectedVersion::Exactly(version))
        .expect("put after restart");
    assert_eq!(
        next_change(&mut changes),
        Change {
            key: "/tenants/t".to_string(),
            version: Some(next)
        }
    );
}

/// Models a broker whose view of a namespace's bundles is stale (another broker split one):
/// an acquisition conditioned on the boundaries it read must fail, naming them, and succeed
/// once re-read.
#[test]
fn an_acquisition_under_stale_conditions_is_refused() {
    let Some(etcd) = Etcd::start() else { return };
    let cluster = cluster(&etcd.url());
    let session = session(&cluster, "b1", 60);
    let boundaries = "bundles/ns".to_string();
    let stale = Compare::Absent(boundaries.clone());
    let written = session
        .fenced_commit(
            &acquired(session.try_acquire("ns/other").expect("acquire")),
            &[],
            &[Op::Put {
                key: boundaries.clone(),
                value: b"split".to_vec(),
                lease: 0,
            }],
        )
        .expect("commit");
    match session.try_acquire_if("ns/0", std::slice::from_ref(&stale)) {
        Err(EtcdError::CompareFailed { key, .. }) => assert!(key.ends_with("bundles/ns"), "{key}"),
        other => panic!("expected CompareFailed, got {other:?}"),
    }
    assert_eq!(cluster.owner("ns/0").expect("owner"), None);
    let fresh = Compare::ModRevision(boundaries, written);
    let ownership = acquired(session.try_acquire_if("ns/0", &[fresh]).expect("acquire"));
    assert_eq!(ownership.epoch(), 1);
}

/// The load balancer's leader: one session holds the role at a time, keeps it while it lives,
/// and another takes it once that session is gone. A leased key goes with its session.
#[test]
fn one_session_leads_until_it_ends_and_then_another_takes_over() {
    let Some(etcd) = Etcd::start() else { return };
    let cluster = cluster(&etcd.url());
    let first = session(&cluster, "b1", 10);
    let second = session(&cluster, "b2", 10);
    assert!(first.campaign("leader").expect("campaign"));
    assert!(!second.campaign("leader").expect("campaign"));
    assert!(first.campaign("leader").expect("campaign again"));
    first.put_leased("load/b1", b"report").expect("put leased");
    let report = cluster.client().get(&cluster.key("load/b1")).expect("get");
    assert_eq!(report.map(|kv| kv.value), Some(b"report".to_vec()));

    first.close().expect("close");
    assert_eq!(
        cluster.client().get(&cluster.key("load/b1")).expect("get"),
        None
    );
    assert!(second
        .campaign("leader")
        .expect("campaign after the leader left"));
    second.close().expect("close");
}

/// A watcher cut off while etcd compacted away the revisions it had not seen cannot replay
/// them: it tells its listeners so (a change with an empty key: read again what you keep, as
/// after `Lagged`) instead of going on as if nothing had been missed.
#[test]
fn a_watch_that_missed_compacted_changes_tells_its_listeners_to_read_again() {
    let Some(etcd) = Etcd::start() else { return };
    let proxy = Proxy::start(&etcd.address());
    let watched = cluster(&proxy.url()).metadata_store().expect("store");
    let writer = cluster(&etcd.url()).metadata_store().expect("store");
    let mut changes = watched.watch();
    writer
        .put("/k1", b"1", ExpectedVersion::Absent)
        .expect("put");
    assert_eq!(next_change(&mut changes).key, "/k1");

    proxy.cut();
    writer
        .put("/k2", b"2", ExpectedVersion::Absent)
        .expect("put");
    let last = writer
        .put("/k3", b"3", ExpectedVersion::Absent)
        .expect("put");
    etcd.compact(last);
    proxy.heal();

    assert_eq!(
        next_change(&mut changes),
        Change {
            key: String::new(),
            version: None
        },
        "the change to /k2 was compacted away unseen"
    );
    assert_eq!(
        next_change(&mut changes),
        Change {
            key: "/k3".to_string(),
            version: Some(last)
        }
    );
}
