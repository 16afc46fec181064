//! round-robin, maglev and session affinity on the real kernel.

use std::{collections::BTreeMap, thread, time::Duration};

use socklb_tests::{client::per_pod, manifests::pod_ips, require_privileges, testbed::Testbed};

#[test]
fn round_robin_spreads_connections_evenly_whatever_is_open() {
    require_privileges!();
    let (bed, spec) =
        Testbed::serving("rr", 11, 3, |s| s.algorithm = Some("round-robin"), &[]).unwrap();
    let mut c = bed.client().unwrap();
    // One at a time: each CPU walks the pods in turn, so every pod gets its share give or take
    // one per CPU the client ran on.
    let mut outcomes = Vec::new();
    for _ in 0..30 {
        outcomes.extend(c.open(spec.target(), 1).unwrap());
    }
    let spread = per_pod(&outcomes);
    let cpus = thread::available_parallelism().unwrap().get() as u64;
    let (lo, hi) = (
        spread.values().min().unwrap(),
        spread.values().max().unwrap(),
    );
    assert_eq!(spread.len(), 3, "{spread:?}");
    assert!(hi - lo <= cpus, "{spread:?} on {cpus} CPUs");
}

#[test]
fn maglev_keeps_clients_on_their_pod_and_a_scale_up_moves_about_one_in_n() {
    require_privileges!();
    let (mut bed, mut spec) =
        Testbed::serving("mg", 12, 5, |s| s.algorithm = Some("maglev"), &[]).unwrap();
    let mut c = bed.client().unwrap();
    let ports: Vec<u16> = (20_000..20_300).collect();
    let target = spec.target();
    let owner = |c: &mut socklb_tests::client::Client| -> Vec<String> {
        let outcomes = c.open_bound(target, &ports).unwrap();
        c.close_all().unwrap();
        outcomes
            .into_iter()
            .map(|o| o.pod.expect("connected"))
            .collect()
    };
    // The client key is (network namespace, bound port): 300 keys spread over the 5 pods...
    let first = owner(&mut c);
    let mut share: BTreeMap<&String, u32> = BTreeMap::new();
    for pod in &first {
        *share.entry(pod).or_default() += 1;
    }
    assert_eq!(share.len(), 5, "{share:?}");
    assert!(share.values().all(|n| (30..=90).contains(n)), "{share:?}");
    // ...and the same key goes to the same pod again.
    assert_eq!(owner(&mut c), first);

    // A sixth pod takes about 1/6 of the keys; the others stay where they were.
    let sixth = pod_ips(12, 6)[5];
    bed.add_pods(&[sixth], 8080).unwrap();
    spec.pods.push(sixth.into());
    bed.write_service(&spec).unwrap();
    bed.agent().wait_backends("demo/web", &spec.pods).unwrap();
    let after = owner(&mut c);
    let moved = first.iter().zip(&after).filter(|(a, b)| a != b).count();
    let to_new = after.iter().filter(|p| *p == "pod-6").count();
    assert!(
        (25..=80).contains(&moved),
        "{moved} of 300 keys moved (ideal 50)"
    );
    assert!(
        to_new * 10 >= moved * 8,
        "{to_new} of the {moved} moved keys went to the new pod"
    );

    // Without a bound port the key is the namespace alone: one pod for every connection.
    let plain = per_pod(&c.open(target, 10).unwrap());
    assert_eq!(plain.len(), 1, "{plain:?}");
}

#[test]
fn session_affinity_keeps_a_client_on_one_pod_until_the_timeout() {
    require_privileges!();
    let (bed, spec) =
        Testbed::serving("aff", 13, 3, |s| s.affinity_timeout = Some(1), &[]).unwrap();
    let mut c = bed.client().unwrap();
    // least-conn alone would spread these; affinity keeps them on the first pod.
    let first = per_pod(&c.open(spec.target(), 1).unwrap());
    let more = per_pod(&c.open(spec.target(), 5).unwrap());
    assert_eq!(
        first.keys().collect::<Vec<_>>(),
        more.keys().collect::<Vec<_>>(),
        "{more:?}"
    );

    // After the timeout the choice is free again: least-conn avoids the loaded pod, and the
    // client sticks to its new pod from then on.
    thread::sleep(Duration::from_millis(1_300));
    let next = per_pod(&c.open(spec.target(), 1).unwrap());
    assert_ne!(
        next.keys().next(),
        first.keys().next(),
        "{next:?} after {first:?}"
    );
    let again = per_pod(&c.open(spec.target(), 3).unwrap());
    assert_eq!(
        again.keys().collect::<Vec<_>>(),
        next.keys().collect::<Vec<_>>()
    );
}
