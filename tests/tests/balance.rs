//! Balancing, judged by the pods' own view (each pod counts the connections it accepted).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    thread,
};

use lb_common::slow_start_load;
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

/// `socklb.io/slow-start`: pods that join take new connections at the pace of a linear ramp
/// over the window (judged connect by connect against the ramp's rule), not all at once, and
/// the Service is even once it has passed.
#[test]
fn slow_start_ramps_joining_pods_up_over_the_window_then_evens_out() {
    require_privileges!();
    const WINDOW_MS: u64 = 6_000;
    let mut bed = Testbed::new("ss").unwrap();
    let first = pod_ips(9, 4);
    bed.add_pods(&first, 8080).unwrap();
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 96, 9, 10), 80);
    let mut spec = ServiceSpec::new("web", *vip.ip(), 80, 8080, &first);
    spec.slow_start = Some("6s");
    bed.write_service(&spec).unwrap();
    bed.start_agent(&[]).unwrap();
    let mut held = bed.client().unwrap();
    assert!(held.open(vip, 32).unwrap().iter().all(|o| o.ok));

    let all = pod_ips(9, 8);
    bed.add_pods(&all[4..], 8080).unwrap();
    let new: Vec<String> = all[4..]
        .iter()
        .map(|ip| bed.pod_at(*ip).name.clone())
        .collect();
    spec.set_pods(&all);
    bed.write_service(&spec).unwrap();
    bed.agent().wait_backends("demo/web", &spec.pods).unwrap();

    // The new pods' age in their window, as the maps say (they joined in one change).
    let age_ms = || -> u64 {
        let rows = bed.agent().backends().unwrap();
        let left = rows.iter().filter_map(|b| b.slow_start_left_ms).max();
        WINDOW_MS - left.unwrap_or(0).min(WINDOW_MS)
    };
    let load = |n: u64, pod: &str, age: u64| match new.iter().any(|p| p == pod) {
        true => slow_start_load(n, age, WINDOW_MS),
        false => n * 1024,
    };
    let mut c = bed.client().unwrap();
    let mut checkpoints = Vec::new();
    let mut connects = 0;
    loop {
        let before = age_ms();
        if before >= WINDOW_MS {
            break;
        }
        let open: BTreeMap<String, u64> = bed.accepted().into_iter().collect();
        let o = c.open(vip, 1).unwrap().remove(0);
        assert!(o.ok, "{o:?}");
        let after = age_ms();
        connects += 1;
        // Least-conn picked the lowest ramped load at some moment between the two looks. A
        // ramped load only falls with age, so the chosen pod at its lowest possible load (the
        // later look) must be no heavier than every other pod at its highest (the earlier).
        let pod = o.pod.unwrap();
        let chosen = load(open[&pod], &pod, after);
        for (other, n) in &open {
            assert!(
                chosen <= load(*n, other, before),
                "connect {connects} at {before}..{after} ms went to {pod} ({} open) though \
                 {other} ({n} open) was lighter under the ramp: {open:?}",
                open[&pod]
            );
        }
        if checkpoints.len() < 3 && after >= (checkpoints.len() as u64 + 1) * WINDOW_MS / 4 {
            checkpoints.push((after, bed.accepted()));
        }
        assert!(connects < 400, "the window never ended: {} ms", after);
        thread::sleep(std::time::Duration::from_millis(60));
    }
    // The new pods' mean count followed the ramp: f * (old mean + 1) - 1, within one.
    for (age, counts) in &checkpoints {
        let (mut old, mut fresh) = (Vec::new(), Vec::new());
        for (pod, n) in counts {
            match new.contains(pod) {
                true => fresh.push(*n as f64),
                false => old.push(*n as f64),
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let ramp = *age as f64 / WINDOW_MS as f64 * (mean(&old) + 1.0) - 1.0;
        assert!(
            (mean(&fresh) - ramp.max(0.0)).abs() <= 1.0,
            "at {age} ms the new pods held {fresh:?} on average {}, the ramp says {ramp:.1} \
             (old pods {old:?})",
            mean(&fresh)
        );
    }
    assert_eq!(checkpoints.len(), 3, "{connects} connects in the window");
    // After the window it is plain least-conn: a few more connections make it even.
    for _ in 0..8 {
        assert!(c.open(vip, 1).unwrap()[0].ok);
    }
    let counts: Vec<u64> = bed.accepted().into_iter().map(|(_, n)| n).collect();
    let spread = counts.iter().max().unwrap() - counts.iter().min().unwrap();
    assert!(spread <= 1, "spread {spread} after the window: {counts:?}");
}
