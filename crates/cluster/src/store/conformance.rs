//! One behaviour test that every [`Store`] implementation passes: the control plane relies
//! on exactly these properties, whichever store it runs on.
use std::time::{Duration, Instant};

use super::{Commit, Cond, Event, Store, StoreError, Txn, Watch};

fn done(c: Commit) -> i64 {
    match c {
        Commit::Done(r) => r,
        Commit::Conflict => panic!("a commit whose compares hold conflicted"),
    }
}

async fn next_event(w: &mut impl Watch) -> Event {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("no watch event within 10 s")
        .expect("the watch failed")
}

/// Runs the suite against an empty store (keys under `/t/`).
pub async fn run<S: Store>(s: &S) {
    // Revisions: every commit gets a larger one; a key remembers creation and change.
    let r1 = done(s.commit(Txn::new().put("/t/a", "1")).await.unwrap());
    let r2 = done(s.commit(Txn::new().put("/t/a", "2")).await.unwrap());
    assert!(r2 > r1);
    let a = s.get("/t/a").await.unwrap().unwrap();
    assert_eq!(
        (
            a.value.as_slice(),
            a.create_revision,
            a.mod_revision,
            a.lease
        ),
        (&b"2"[..], r1, r2, None)
    );
    assert_eq!(s.get("/t/none").await.unwrap(), None);

    // Compare-and-swap: a stale revision conflicts and writes nothing; the current one wins.
    let stale = s
        .commit(
            Txn::new()
                .when("/t/a", Cond::ModRevision(r1))
                .put("/t/a", "x"),
        )
        .await
        .unwrap();
    assert_eq!(stale, Commit::Conflict);
    assert_eq!(s.get("/t/a").await.unwrap().unwrap().value, b"2");
    let r3 = done(
        s.commit(
            Txn::new()
                .when("/t/a", Cond::ModRevision(r2))
                .put("/t/a", "3"),
        )
        .await
        .unwrap(),
    );
    assert!(r3 > r2);

    // Absent / Present, and all-or-nothing across keys.
    let both = Txn::new()
        .when("/t/b", Cond::Absent)
        .when("/t/a", Cond::Present)
        .put("/t/b", "b")
        .put("/t/c", "c");
    let r4 = done(s.commit(both.clone()).await.unwrap());
    assert_eq!(
        s.commit(both).await.unwrap(),
        Commit::Conflict,
        "b exists now"
    );
    let b = s.get("/t/b").await.unwrap().unwrap();
    let c = s.get("/t/c").await.unwrap().unwrap();
    assert_eq!(
        (b.mod_revision, c.mod_revision),
        (r4, r4),
        "one revision per txn"
    );
    let missing = s
        .commit(Txn::new().when("/t/none", Cond::Present).put("/t/d", "d"))
        .await
        .unwrap();
    assert_eq!(missing, Commit::Conflict);
    assert_eq!(s.get("/t/d").await.unwrap(), None);

    // Listing: sorted, only the prefix, with the revision read at.
    done(s.commit(Txn::new().put("/u/x", "other")).await.unwrap());
    let l = s.list("/t/").await.unwrap();
    let keys: Vec<&str> = l.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/t/a", "/t/b", "/t/c"]);
    assert!(l.revision > r4);

    // Watches: from a past revision, then live; only the prefix; deletes included.
    let mut w = s.watch("/t/", r3).await.unwrap();
    for (key, rev) in [("/t/a", r3), ("/t/b", r4), ("/t/c", r4)] {
        match next_event(&mut w).await {
            Event::Put(kv) => assert_eq!((kv.key.as_str(), kv.mod_revision), (key, rev)),
            e => panic!("expected a put of {key}, got {e:?}"),
        }
    }
    let r5 = done(
        s.commit(Txn::new().delete("/t/b").put("/u/y", "y"))
            .await
            .unwrap(),
    );
    assert_eq!(
        next_event(&mut w).await,
        Event::Delete {
            key: "/t/b".into(),
            revision: r5
        }
    );

    // Leases: keys under a lease vanish when it is revoked, with a delete event.
    let lease = s.grant(Duration::from_secs(5)).await.unwrap();
    assert_eq!(s.keep_alive(lease).await.unwrap(), Duration::from_secs(5));
    let r6 = done(
        s.commit(Txn::new().put_leased("/t/leased", "l", lease))
            .await
            .unwrap(),
    );
    assert_eq!(
        s.get("/t/leased").await.unwrap().unwrap().lease,
        Some(lease)
    );
    assert!(matches!(next_event(&mut w).await, Event::Put(kv) if kv.mod_revision == r6));
    s.revoke(lease).await.unwrap();
    assert_eq!(s.get("/t/leased").await.unwrap(), None);
    assert!(matches!(next_event(&mut w).await, Event::Delete { key, .. } if key == "/t/leased"));
    let renewed = s.keep_alive(lease).await;
    assert!(
        matches!(renewed, Err(StoreError::NoLease(l)) if l == lease),
        "{renewed:?}"
    );
    let e = s
        .commit(Txn::new().put_leased("/t/late", "x", lease))
        .await
        .expect_err("a put under a revoked lease is refused");
    assert!(matches!(e, StoreError::NoLease(_)), "{e}");

    // A lease not kept alive ends by itself within its time to live (plus the store's
    // expiry tick).
    let short = s.grant(Duration::from_secs(1)).await.unwrap();
    done(
        s.commit(Txn::new().put_leased("/t/short", "s", short))
            .await
            .unwrap(),
    );
    assert!(matches!(next_event(&mut w).await, Event::Put(_)));
    let t = Instant::now();
    assert!(matches!(next_event(&mut w).await, Event::Delete { key, .. } if key == "/t/short"));
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert_eq!(s.get("/t/short").await.unwrap(), None);

    // Bad lease lengths are refused, naming the value.
    let e = s.grant(Duration::from_millis(1500)).await.err().unwrap();
    assert!(e.to_string().contains("1.5s"), "{e}");
}
