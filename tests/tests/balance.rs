//! Balancing, judged by the pods' own view (each pod counts the connections it accepted).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    thread,
    time::{Duration, Instant},
};

use socklb_tests::{
    client::per_pod,
    manifests::{ServiceSpec, pod_ips},
    require_privileges,
    testbed::Testbed,
};

#[test]
fn least_conn_spreads_a_burst_evenly_and_a_scale_up_fills_the_new_pods_first() {
    require_privileges!();
    let mut bed = Testbed::new("lc").unwrap();
    let first = pod_ips(6, 3);
    bed.add_pods(&first, 8080).unwrap();
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 96, 6, 10), 80);
    let mut spec = ServiceSpec::new("web", *vip.ip(), 80, 8080, &first);
    bed.write_service(&spec).unwrap();
    bed.start_agent(&[]).unwrap();

    // Two client processes open 15 long-lived connections each, all at the same moment.
    let clients: Vec<_> = (0..2).map(|_| bed.client().unwrap()).collect();
    let opened: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            thread::spawn(move || {
                let outcomes = c.open(vip, 15).unwrap();
                (c, outcomes)
            })
        })
        .collect();
    let mut clients = Vec::new();
    for h in opened {
        let (c, outcomes) = h.join().unwrap();
        assert!(outcomes.iter().all(|o| o.ok), "{outcomes:?}");
        clients.push(c);
    }
    let accepted = bed.accepted();
    for (pod, n) in &accepted {
        assert!(
            (9..=11).contains(n),
            "{pod} accepted {n}; all: {accepted:?}"
        );
    }

    // Scale up to six pods while those 30 connections stay open.
    let second = pod_ips(6, 6)[3..].to_vec();
    bed.add_pods(&second, 8080).unwrap();
    spec.set_pods(&pod_ips(6, 6));
    bed.write_service(&spec).unwrap();
    bed.agent().wait_backends("demo/web", &spec.pods).unwrap();
    let before: BTreeMap<String, u64> = bed.accepted().into_iter().collect();

    // New connections go only to the least-loaded pods until they have caught up: one at a
    // time, each must land on a pod with the fewest open connections.
    let mut c = bed.client().unwrap();
    for _ in 0..30 {
        let open: BTreeMap<String, u64> = bed.accepted().into_iter().collect();
        let least = open.values().min().copied().unwrap();
        let o = c.open(vip, 1).unwrap().remove(0);
        let pod = o.pod.unwrap();
        assert_eq!(
            open[&pod], least,
            "{pod} had {} open, least was {least}: {open:?}",
            open[&pod]
        );
    }
    for (pod, n) in bed.accepted() {
        let added = n - before[&pod];
        if pod.ends_with("-1") || pod.ends_with("-2") || pod.ends_with("-3") {
            assert_eq!(
                added, 0,
                "{pod} was already loaded and got {added} of the new connections"
            );
        } else {
            assert_eq!(n, 10, "{pod} caught up to the mean");
        }
    }
    // The old connections are still where they were, and working.
    for c in &mut clients {
        assert_eq!(c.requests(1).unwrap().values().sum::<u64>(), 15);
    }
}

#[test]
fn random_is_uniform_by_a_chi_square_test() {
    require_privileges!();
    let (bed, spec) = Testbed::serving("rnd", 7, 3, |s| s.algorithm = Some("random"), &[]).unwrap();
    let vip = spec.target();

    // 30 bursts of 100 connections: 3,000 independent draws.
    let mut c = bed.client().unwrap();
    let mut totals: BTreeMap<String, u64> = BTreeMap::new();
    let mut bursts_within_one = 0;
    for _ in 0..30 {
        let burst = per_pod(&c.open(vip, 100).unwrap());
        c.close_all().unwrap();
        let (lo, hi) = (burst.values().min().unwrap(), burst.values().max().unwrap());
        if burst.len() == 3 && hi - lo <= 1 {
            bursts_within_one += 1;
        }
        for (pod, n) in burst {
            *totals.entry(pod).or_default() += n;
        }
    }
    let n: u64 = totals.values().sum();
    assert_eq!(n, 3000);
    let expected = n as f64 / 3.0;
    let chi2: f64 = totals
        .values()
        .map(|o| (*o as f64 - expected).powi(2) / expected)
        .sum();
    // Critical value of chi-square with 2 degrees of freedom at p = 0.0001.
    assert!(
        chi2 < 18.42,
        "chi-square {chi2:.2} rejects uniformity: {totals:?}"
    );
    // And it is a draw, not least-conn in disguise: bursts are not all near-perfectly even.
    assert!(
        bursts_within_one < 15,
        "{bursts_within_one} of 30 bursts were even to within one"
    );
}

/// Several nodes: each agent only counts its own node's connections, so per node the pods
/// are within one of each other, and the cluster-wide spread (busiest pod minus idlest) can be
/// at most the number of nodes. Random tie-breaks keep it well below that on average; a fixed
/// tie-break order would stack every node's remainder on the same pods.
#[test]
fn the_cluster_wide_spread_stays_within_one_per_node() {
    require_privileges!();
    const NODES: usize = 3;
    let (bed, spec) = Testbed::serving("nodes", 16, 4, |_| {}, &[]).unwrap();
    let cgroups: Vec<_> = (1..NODES)
        .map(|_| socklb_tests::cgroup::Cgroup::new("node").unwrap())
        .collect();
    let _agents: Vec<_> = cgroups
        .iter()
        .map(|cg| socklb_tests::agent::Agent::start(&bed.manifests, cg, &[]).unwrap())
        .collect();
    let node_cgroups: Vec<&socklb_tests::cgroup::Cgroup> =
        std::iter::once(&bed.cgroup).chain(&cgroups).collect();
    let mut clients: Vec<_> = node_cgroups
        .iter()
        .map(|cg| socklb_tests::client::Client::spawn(&bed.netns, Some(cg.path())).unwrap())
        .collect();

    let mut seed = 0x5eed_u64; // fixed: the same connection counts every run
    let mut spreads = Vec::new();
    for _ in 0..20 {
        for c in &mut clients {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            for _ in 0..(seed >> 33) % 9 + 1 {
                assert!(c.open(spec.target(), 1).unwrap()[0].ok);
            }
        }
        let open: Vec<u64> = bed.open().into_iter().map(|(_, n)| n).collect();
        spreads.push(open.iter().max().unwrap() - open.iter().min().unwrap());
        for c in &mut clients {
            c.close_all().unwrap();
        }
        socklb_tests::wait_for("pods to drain", std::time::Duration::from_secs(5), || {
            Ok(bed.open().iter().all(|(_, n)| *n == 0).then_some(()))
        })
        .unwrap();
    }
    assert!(
        spreads.iter().all(|s| *s <= NODES as u64),
        "spreads {spreads:?}"
    );
}

/// `socklb.io/slow-start`: pods that join get a share of the new connections that ramps up
/// linearly over the window (`f` times what least-conn alone gives them, judged per quarter of
/// the window), and least-conn evens the Service out once it has passed.
#[test]
fn slow_start_ramps_joining_pods_share_up_over_the_window_then_evens_out() {
    require_privileges!();
    const WINDOW_MS: f64 = 6_000.0;
    let mut bed = Testbed::new("ss").unwrap();
    let first = pod_ips(9, 4);
    bed.add_pods(&first, 8080).unwrap();
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 96, 9, 10), 80);
    let mut spec = ServiceSpec::new("web", *vip.ip(), 80, 8080, &first);
    spec.slow_start = Some("6s");
    bed.write_service(&spec).unwrap();
    bed.start_agent(&[]).unwrap();
    // The old pods hold 150 each: more than the new ones reach in the window, so least-conn
    // alone would send the new ones every new connection throughout.
    let mut held = bed.client().unwrap();
    assert!(held.open(vip, 600).unwrap().iter().all(|o| o.ok));

    let all = pod_ips(9, 8);
    bed.add_pods(&all[4..], 8080).unwrap();
    let new: Vec<String> = all[4..]
        .iter()
        .map(|ip| bed.pod_at(*ip).name.clone())
        .collect();
    spec.set_pods(&all);
    bed.write_service(&spec).unwrap();
    bed.agent().wait_backends("demo/web", &spec.pods).unwrap();
    // Where the new pods are in their window, as the maps say (they joined in one change).
    let left = bed.agent().backends().unwrap();
    let left = left.iter().filter_map(|b| b.slow_start_left_ms).max();
    let age_at_start = WINDOW_MS - left.expect("the new pods ramp") as f64;
    let start = Instant::now();
    let age = || age_at_start + start.elapsed().as_secs_f64() * 1_000.0;

    // (fraction of the window gone, went to a new pod) per connect.
    let mut c = bed.client().unwrap();
    let mut connects: Vec<(f64, bool)> = Vec::new();
    while age() < WINDOW_MS && connects.len() < 5_000 {
        let before = age();
        let o = c.open(vip, 1).unwrap().remove(0);
        assert!(o.ok, "{o:?}");
        let f = ((before + age()) / 2.0 / WINDOW_MS).min(1.0);
        connects.push((f, new.contains(&o.pod.unwrap())));
        thread::sleep(Duration::from_millis(4));
    }
    let counts: BTreeMap<String, u64> = bed.accepted().into_iter().collect();
    let busiest_new = new.iter().map(|p| counts[p]).max().unwrap();
    let idlest_old = counts.iter().filter(|(p, _)| !new.contains(p));
    let idlest_old = idlest_old.map(|(_, n)| *n).min().unwrap();
    assert!(
        busiest_new < idlest_old,
        "the new pods caught up within the window, so least-conn's own share fell: {counts:?}"
    );
    // Per quarter: the new pods took each connect with probability f; four standard
    // deviations (plus two for the ends of the quarter) is the tolerance.
    for q in 0..4 {
        let (lo, hi) = (q as f64 / 4.0, (q + 1) as f64 / 4.0);
        let quarter: Vec<&(f64, bool)> = connects
            .iter()
            .filter(|(f, _)| *f >= lo && *f < hi)
            .collect();
        assert!(
            quarter.len() >= 50,
            "quarter {q}: {} connects",
            quarter.len()
        );
        let expected: f64 = quarter.iter().map(|(f, _)| f).sum();
        let sd = quarter
            .iter()
            .map(|(f, _)| f * (1.0 - f))
            .sum::<f64>()
            .sqrt();
        let got = quarter.iter().filter(|(_, to_new)| *to_new).count() as f64;
        assert!(
            (got - expected).abs() <= 4.0 * sd + 2.0,
            "quarter {q} of the window: the new pods got {got} of {} connects, the ramp says \
             {expected:.0} ± {:.0}",
            quarter.len(),
            4.0 * sd + 2.0
        );
    }
    // After the window it is plain least-conn: the new pods take every connection until the
    // Service is even.
    let needed: u64 = counts.values().map(|n| idlest_old.max(*n) - n).sum();
    for o in c.open(vip, needed as usize).unwrap() {
        assert!(
            new.contains(o.pod.as_ref().unwrap()),
            "{o:?} after the window"
        );
    }
    let counts: Vec<u64> = bed.accepted().into_iter().map(|(_, n)| n).collect();
    let spread = counts.iter().max().unwrap() - counts.iter().min().unwrap();
    assert!(spread <= 1, "spread {spread} after the window: {counts:?}");
}

/// Slow start over more than 32 backends, where least-conn compares 32 slots at random: a
/// scale-up from 2 to 100 pods puts mostly new pods in those 32, and when every one of them
/// sits the connect out the walk goes on to a pod that takes part (without that, about half
/// the connects went to new pods at the very start of the window).
#[test]
fn slow_start_holds_back_a_large_scale_up_beyond_the_compared_slots() {
    require_privileges!();
    let all = pod_ips(31, 100);
    let mut bed = Testbed::new("ssl").unwrap();
    bed.add_pods(&all, 8080).unwrap();
    let mut spec = ServiceSpec::new("web", Ipv4Addr::new(10, 96, 31, 10), 80, 8080, &all[..2]);
    spec.slow_start = Some("1h");
    bed.write_service(&spec).unwrap();
    bed.start_agent(&[]).unwrap();
    spec.set_pods(&all);
    bed.write_service(&spec).unwrap();
    bed.agent().wait_backends("demo/web", &all).unwrap();
    // Within the first seconds of a one-hour window a new pod takes part in well under 1%
    // of the connects: of 200, the 98 new pods may get a few, not half.
    let mut c = bed.client().unwrap();
    let opened = c.open(spec.target(), 200).unwrap();
    assert!(opened.iter().all(|o| o.ok));
    let new: u64 = all[2..].iter().map(|ip| bed.pod_at(*ip).open()).sum();
    assert!(new <= 5, "the new pods got {new} of 200 connects");
}
