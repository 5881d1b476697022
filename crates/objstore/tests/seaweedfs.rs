//! The S3 client and data objects against a real SeaweedFS (see `common/mod.rs` for how it is
//! started). Each test starts its own server on its own ports and directory.

mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::Weed;
use meridian_objstore::{
    data_object_key, read_topic, DataObjectBuilder, DataObjectLimits, DataObjectReader, NewEntry,
    ObjectStore, ObjectStoreError, TopicRange,
};

/// Bound on a call that must not hang: far longer than any timeout configured here, so that a
/// hang fails the test instead of stalling the suite.
const HANG_BOUND: Duration = Duration::from_secs(120);

fn pattern(length: usize, seed: u8) -> Vec<u8> {
    (0..length)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn put_get_head_and_delete_round_trip() {
    let Some(weed) = Weed::start() else { return };
    let store = weed.store();
    let bytes = pattern(100_000, 3);
    store.put("round/trip.bin", &bytes).expect("put");
    assert_eq!(store.get("round/trip.bin").expect("get"), bytes);
    assert_eq!(store.head("round/trip.bin").expect("head").size, 100_000);

    // Overwriting replaces the object whole.
    store.put("round/trip.bin", b"short").expect("put again");
    assert_eq!(store.get("round/trip.bin").expect("get"), b"short");

    store.delete("round/trip.bin").expect("delete");
    assert!(matches!(
        store.get("round/trip.bin"),
        Err(ObjectStoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.head("round/trip.bin"),
        Err(ObjectStoreError::NotFound { .. })
    ));
    // Deleting what is not there succeeds, as in S3.
    store.delete("round/trip.bin").expect("delete again");
    // An empty object is an object.
    store.put("round/empty", b"").expect("put empty");
    assert_eq!(store.get("round/empty").expect("get empty"), b"");

    // The store checks the body against the CRC32C the PUT carries: a body that does not
    // match (damaged on the way, or in memory since its checksum was taken) is not stored.
    let checksum = crc32c::crc32c(b"checked");
    store
        .put_with_checksum("round/checked", b"checked", checksum)
        .expect("put with the right checksum");
    assert_eq!(store.get("round/checked").expect("get checked"), b"checked");
    let error = store
        .put_with_checksum("round/damaged", b"checked", checksum ^ 1)
        .expect_err("a body that does not match its checksum");
    assert!(matches!(error, ObjectStoreError::Invalid { .. }), "{error}");
    assert!(error.to_string().contains("BadDigest"), "{error}");
    assert!(matches!(
        store.get("round/damaged"),
        Err(ObjectStoreError::NotFound { .. })
    ));

    // Keys with characters that need escaping in URLs and signatures.
    let odd_key = "round/with space/plus+percent%25/ünïcode?&=.bin";
    store.put(odd_key, b"odd").expect("put odd key");
    assert_eq!(store.get(odd_key).expect("get odd key"), b"odd");
    let listed = store.list("round/with space/", 10).expect("list odd key");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].key, odd_key);

    // A response larger than the configured bound is refused, not read.
    let mut config = weed.config("test", common::SECRET_ACCESS_KEY);
    config.max_response_bytes = 1000;
    let bounded = ObjectStore::new(&config).expect("store");
    store.put("round/large", &bytes).expect("put large");
    let error = bounded.get("round/large").expect_err("too large");
    assert!(matches!(error, ObjectStoreError::Invalid { .. }), "{error}");
    assert!(error.to_string().contains("limit of 1000"), "{error}");
    assert_eq!(
        bounded
            .get_range("round/large", 500, 1000)
            .expect("range within the bound"),
        &bytes[500..1500]
    );
}

#[test]
fn ranged_and_tail_gets_return_exactly_the_bytes_asked_for() {
    let Some(weed) = Weed::start() else { return };
    let store = weed.store();
    let bytes = pattern(1000, 7);
    store.put("ranges/object", &bytes).expect("put");

    assert_eq!(
        store.get_range("ranges/object", 100, 50).expect("range"),
        &bytes[100..150]
    );
    assert_eq!(
        store.get_range("ranges/object", 0, 1).expect("first byte"),
        &bytes[..1]
    );
    // A range running past the end gets what there is.
    assert_eq!(
        store
            .get_range("ranges/object", 990, 50)
            .expect("past the end"),
        &bytes[990..]
    );
    let error = store
        .get_range("ranges/object", 1000, 10)
        .expect_err("starts at the end");
    assert!(matches!(error, ObjectStoreError::Invalid { .. }), "{error}");

    let tail = store.get_tail("ranges/object", 32).expect("tail");
    assert_eq!(tail.object_size, 1000);
    assert_eq!(tail.bytes, &bytes[968..]);
    let whole = store
        .get_tail("ranges/object", 5000)
        .expect("tail longer than object");
    assert_eq!(whole.object_size, 1000);
    assert_eq!(whole.bytes, bytes);

    assert!(matches!(
        store.get_range("ranges/missing", 0, 10),
        Err(ObjectStoreError::NotFound { .. })
    ));
}

#[test]
fn listing_pages_through_more_keys_than_one_page() {
    let Some(weed) = Weed::start() else { return };
    let mut config = weed.config("test", common::SECRET_ACCESS_KEY);
    config.list_page_keys = 7;
    let store = ObjectStore::new(&config).expect("store");
    let mut keys: Vec<String> = (0..20).map(|i| format!("list/key-{i:03}")).collect();
    for key in &keys {
        store.put(key, key.as_bytes()).expect("put");
    }
    store.put("other/key", b"x").expect("put other");
    store
        .put("listing", b"x")
        .expect("put a key that shares the prefix's start");

    let first = store.list_page("list/", None).expect("first page");
    assert_eq!(first.objects.len(), 7);
    assert!(
        first.next.is_some(),
        "a first page of 20 keys must say there is more"
    );

    let listed = store.list("list/", 100).expect("list");
    let listed_keys: Vec<String> = listed.iter().map(|object| object.key.clone()).collect();
    keys.sort();
    assert_eq!(listed_keys, keys);
    assert!(listed
        .iter()
        .all(|object| object.size == object.key.len() as u64));

    let error = store.list("list/", 10).expect_err("more than allowed");
    assert!(matches!(error, ObjectStoreError::Invalid { .. }), "{error}");
    assert!(store.list("nothing-here/", 10).expect("empty").is_empty());
}

#[test]
fn a_missing_key_is_not_found_and_a_wrong_secret_is_denied() {
    let Some(weed) = Weed::start() else { return };
    let store = weed.store();
    let error = store.get("no/such/key").expect_err("missing");
    assert!(
        matches!(error, ObjectStoreError::NotFound { .. }),
        "{error}"
    );
    assert!(!error.is_retryable());
    let message = error.to_string();
    assert!(
        message.contains("s3://meridian-test/test/no/such/key"),
        "{message}"
    );

    store.put("secret/object", b"hidden").expect("put");
    let intruder = ObjectStore::new(&weed.config("test", "not-the-secret")).expect("store");
    for result in [
        intruder.put("secret/other", b"x").map(|_| ()),
        intruder.get("secret/object").map(|_| ()),
        intruder.list("secret/", 10).map(|_| ()),
    ] {
        let error = result.expect_err("wrong secret");
        assert!(matches!(error, ObjectStoreError::Denied { .. }), "{error}");
        assert!(error.to_string().contains("meridian-test"), "{error}");
    }
    // Nothing was written with the wrong secret.
    assert!(matches!(
        store.get("secret/other"),
        Err(ObjectStoreError::NotFound { .. })
    ));
}

/// Three topics' batches of one group commit, and 700 more topics so that the index is larger
/// than the reader's first GET of the object's end.
#[test]
fn a_data_object_reads_back_topic_by_topic_and_damage_is_refused() {
    let Some(weed) = Weed::start() else { return };
    let store = weed.store();
    let topics = [
        ("persistent://public/default/orders", 0u64, 5usize),
        ("persistent://public/default/payments", 1000, 1),
        ("persistent://tenant/ns/partitioned-partition-3", 42, 30),
    ];
    let batches: Vec<Vec<Vec<u8>>> = topics
        .iter()
        .enumerate()
        .map(|(t, (_, _, count))| {
            (0..*count)
                .map(|i| pattern(50 + i * 100, t as u8 * 10 + i as u8))
                .collect()
        })
        .collect();
    let mut builder = DataObjectBuilder::new(DataObjectLimits::default()).expect("builder");
    for ((topic, first, _), batch) in topics.iter().zip(&batches) {
        let entries: Vec<NewEntry<'_>> = batch
            .iter()
            .enumerate()
            .map(|(i, data)| NewEntry {
                publish_time_ms: 1_750_000_000_000 + i as u64,
                data,
            })
            .collect();
        builder.add_topic(topic, *first, &entries).expect("add");
    }
    let object = builder.finish().expect("finish");
    let key = data_object_key("broker-1", 7, 1);
    store.put(&key, &object.bytes).expect("put");

    let reader = DataObjectReader::open(&store, &key).expect("open");
    assert_eq!(reader.topics(), &object.index[..]);
    for ((topic, first, count), batch) in topics.iter().zip(&batches) {
        let entries = reader.read(topic).expect("read").expect("topic is there");
        assert_eq!(entries.len(), *count);
        for (i, (entry, data)) in entries.iter().zip(batch).enumerate() {
            assert_eq!(entry.entry_id, first + i as u64);
            assert_eq!(entry.publish_time_ms, 1_750_000_000_000 + i as u64);
            assert_eq!(&entry.data[..], &data[..]);
        }
    }
    assert_eq!(
        reader
            .read("persistent://public/default/absent")
            .expect("read"),
        None
    );

    // A byte flipped inside the second topic's records: that topic is refused, the others
    // still read.
    let mut damaged = object.bytes.clone();
    let second = &object.index[1];
    damaged[(second.offset + second.length / 2) as usize] ^= 0x01;
    store.put("damaged.seg", &damaged).expect("put damaged");
    let reader = DataObjectReader::open(&store, "damaged.seg").expect("index is intact");
    let error = reader.read(&second.topic).expect_err("damaged topic");
    assert!(matches!(error, ObjectStoreError::Corrupt { .. }), "{error}");
    assert!(error.to_string().contains("checksum"), "{error}");
    assert!(reader.read(topics[0].0).expect("first topic").is_some());
    assert!(reader.read(topics[2].0).expect("third topic").is_some());

    // Truncated objects (a cut in the records, in the index, in the footer) are refused.
    let records_end = object.index[2].offset + object.index[2].length;
    for cut in [
        records_end / 2,
        records_end + 3,
        object.bytes.len() as u64 - 1,
    ] {
        let key = format!("truncated-{cut}.seg");
        store
            .put(&key, &object.bytes[..cut as usize])
            .expect("put truncated");
        let error = DataObjectReader::open(&store, &key).expect_err("truncated");
        assert!(matches!(error, ObjectStoreError::Corrupt { .. }), "{error}");
        assert!(error.to_string().contains(&key), "{error}");
    }
    // A range recorded elsewhere (as etcd will hold it) that overruns a shortened object.
    store
        .put("short.seg", &object.bytes[..records_end as usize - 1])
        .expect("put short");
    let error = read_topic(&store, "short.seg", &object.index[2]).expect_err("short read");
    assert!(matches!(error, ObjectStoreError::Corrupt { .. }), "{error}");
    assert!(error.to_string().contains("truncated"), "{error}");

    // An index larger than the reader's first read of the object's end.
    let mut builder = DataObjectBuilder::new(DataObjectLimits::default()).expect("builder");
    let names: Vec<String> = (0..700)
        .map(|i| format!("persistent://tenant/namespace/a-topic-with-a-long-name-{i:05}"))
        .collect();
    for (i, name) in names.iter().enumerate() {
        let data = pattern(20, i as u8);
        builder
            .add_topic(
                name,
                i as u64,
                &[NewEntry {
                    publish_time_ms: 1,
                    data: &data,
                }],
            )
            .expect("add");
    }
    let large = builder.finish().expect("finish");
    store.put("large-index.seg", &large.bytes).expect("put");
    let reader = DataObjectReader::open(&store, "large-index.seg").expect("open large");
    assert_eq!(reader.topics().len(), 700);
    let last: &TopicRange = reader.range(&names[699]).expect("last topic");
    assert_eq!(last.first_entry_id, 699);
    let entries = reader.read(&names[699]).expect("read").expect("present");
    assert_eq!(&entries[0].data[..], &pattern(20, 699u32 as u8)[..]);
}

/// Runs `call` on a thread and waits for it at most `HANG_BOUND`: a call that hangs fails the
/// test instead of stalling it.
fn without_hanging<T: Send + 'static>(what: &str, call: impl FnOnce() -> T + Send + 'static) -> T {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(call());
    });
    receiver
        .recv_timeout(HANG_BOUND)
        .unwrap_or_else(|_| panic!("{what} did not return within {HANG_BOUND:?}"))
}

/// Models an object-store outage: first a server that accepts connections and never answers
/// (SIGSTOP), then one that is gone (kill -9), then its restart on the same directory.
#[test]
fn an_outage_fails_with_unavailable_and_objects_survive_a_restart() {
    let Some(mut weed) = Weed::start() else {
        return;
    };
    let store = weed.store();
    let bytes = pattern(10_000, 11);
    store.put("durable/object", &bytes).expect("put");
    let mut builder = DataObjectBuilder::new(DataObjectLimits::default()).expect("builder");
    builder
        .add_topic(
            "persistent://t/n/kept",
            5,
            &[NewEntry {
                publish_time_ms: 9,
                data: b"kept across a restart",
            }],
        )
        .expect("add");
    store
        .put(
            "durable/commit.seg",
            &builder.finish().expect("finish").bytes,
        )
        .expect("put data object");

    // A hung server: requests time out instead of waiting forever.
    let mut config = weed.config("test", common::SECRET_ACCESS_KEY);
    config.connect_timeout = Duration::from_secs(1);
    config.request_timeout = Duration::from_secs(2);
    weed.pause(true);
    let hung = ObjectStore::new(&config).expect("store");
    let error = without_hanging("a get from a stopped server", move || {
        hung.get("durable/object")
    })
    .expect_err("stopped server");
    assert!(
        matches!(error, ObjectStoreError::Unavailable { .. }),
        "{error}"
    );
    assert!(error.is_retryable());
    weed.pause(false);
    assert_eq!(
        store.get("durable/object").expect("get after resume"),
        bytes
    );

    // A dead server: every operation fails at once with Unavailable.
    weed.kill();
    let dead = ObjectStore::new(&config).expect("store");
    let errors = without_hanging("operations on a dead server", move || {
        vec![
            dead.put("durable/new", b"x").map(|_| ()),
            dead.get("durable/object").map(|_| ()),
            dead.get_range("durable/object", 0, 10).map(|_| ()),
            dead.head("durable/object").map(|_| ()),
            dead.list("durable/", 10).map(|_| ()),
            dead.delete("durable/object").map(|_| ()),
        ]
    });
    for result in errors {
        let error = result.expect_err("dead server");
        assert!(
            matches!(error, ObjectStoreError::Unavailable { .. }),
            "{error}"
        );
        assert!(
            error
                .to_string()
                .contains("s3://meridian-test/test/durable/"),
            "{error}"
        );
    }

    // Restarted on the same directory: what was written before is there.
    weed.launch();
    eprintln!(
        "weed mini restarted on its directory in {:?}",
        weed.started_in
    );
    let store = weed.store();
    // Just after a restart weed may answer 500 for an object written before until its volume
    // server has reported its volumes again: a retryable error is awaited, any other fails.
    let deadline = Instant::now() + Duration::from_secs(60);
    let read_back = loop {
        match store.get("durable/object") {
            Ok(read) => break read,
            Err(error) if error.is_retryable() && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(error) => panic!("get after restart: {error}"),
        }
    };
    assert_eq!(read_back, bytes);
    let reader = DataObjectReader::open(&store, "durable/commit.seg").expect("open");
    let entries = reader
        .read("persistent://t/n/kept")
        .expect("read")
        .expect("present");
    assert_eq!(entries[0].entry_id, 5);
    assert_eq!(&entries[0].data[..], b"kept across a restart");
}
