//! round-robin, maglev, session affinity, least-conn over many pods and scale-downs on the
//! real kernel.

use std::{collections::BTreeMap, net::Ipv4Addr, thread, time::Duration};

use socklb_tests::{
    client::per_pod,
    manifests::{ServiceSpec, pod_ips},
    require_privileges,
    testbed::Testbed,
};

#[test]
fn round_robin_gives_each_pod_its_share_within_one_per_cpu() {
    require_privileges!();
    let (bed, spec) =
        Testbed::serving("rr", 11, 6, |s| s.algorithm = Some("round-robin"), &[]).unwrap();
    // Two processes, 300 short connections each. Each CPU walks the pods in turn with its own
    // cursor, so of 600 connections each pod gets 100, give or take one per CPU that ran
    // connects (random choice would be some ten off).
    let before: Vec<u64> = bed.accepted().iter().map(|(_, n)| *n).collect();
    for (ok, errors) in bed.churn(2, spec.target(), 300).unwrap().join() {
        assert_eq!(ok, 300, "{errors:?}");
    }
    let got: Vec<u64> = bed
        .accepted()
        .iter()
        .zip(&before)
        .map(|((_, n), b)| n - b)
        .collect();
    let cpus = thread::available_parallelism().unwrap().get() as u64;
    assert_eq!(got.iter().sum::<u64>(), 600, "{got:?}");
    assert!(
        got.iter().all(|n| n.abs_diff(100) <= cpus),
        "{got:?} on {cpus} CPUs"
    );
}

#[test]
fn no_connect_is_refused_while_pods_flip_between_6_and_3_whatever_the_algorithm() {
    require_privileges!();
    for (i, algorithm) in ["random", "round-robin", "least-conn", "maglev"]
        .into_iter()
        .enumerate()
    {
        let subnet = 20 + i as u8;
        let (bed, spec) = Testbed::serving(
            &format!("sd{i}"),
            subnet,
            6,
            |s| s.algorithm = Some(algorithm),
            &[],
        )
        .unwrap();
        let ips = pod_ips(subnet, 6);
        let flipper = bed.flip_pods(
            &spec,
            [ips[..3].to_vec(), ips.clone()],
            Duration::from_millis(150),
            400,
        );
        // A connect storm from two processes while the count goes down and up again.
        for (ok, errors) in bed.churn(2, spec.target(), 4_000).unwrap().join() {
            assert_eq!(ok, 4_000, "{algorithm}: {errors:?}");
        }
        let flips = flipper.stop();
        assert!(flips >= 6, "{algorithm}: only {flips} flips");
    }
}

#[test]
fn least_conn_over_many_pods_gives_a_scale_up_its_share() {
    require_privileges!();
    // Over 32 backends least-conn compares 32 slots drawn at random. 500 connections over
    // 50 pods, then 50 more pods and 500 more connections: the new pods should get nearly all
    // of them (a simulation of the sampling: at least 495 in 2,000 runs, spread at most 2; a
    // window of consecutive slots gave them 372-435 as the new ones are one block).
    let all = pod_ips(30, 100);
    let mut bed = Testbed::new("lcb").unwrap();
    bed.add_pods(&all, 8080).unwrap();
    let mut spec = ServiceSpec::new("web", Ipv4Addr::new(10, 96, 30, 10), 80, 8080, &all[..50]);
    bed.write_service(&spec).unwrap();
    bed.start_agent(&[]).unwrap();
    let mut first = bed.client().unwrap();
    let opened = first.open_one_by_one(spec.target(), 500).unwrap();
    assert!(opened.iter().all(|o| o.ok));
    spec.set_pods(&all);
    bed.write_service(&spec).unwrap();
    bed.agent().wait_backends("demo/web", &all).unwrap();
    let mut second = bed.client().unwrap();
    let opened = second.open_one_by_one(spec.target(), 500).unwrap();
    assert!(opened.iter().all(|o| o.ok));
    let open: Vec<u64> = all.iter().map(|ip| bed.pod_at(*ip).open()).collect();
    let new: u64 = open[50..].iter().sum();
    let spread = open.iter().max().unwrap() - open.iter().min().unwrap();
    assert_eq!(open.iter().sum::<u64>(), 1_000, "{open:?}");
    assert!(
        new >= 490 && spread <= 2,
        "new pods got {new}, spread {spread}: {open:?}"
    );
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
