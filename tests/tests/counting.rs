//! Live connection counts: exact from the moment of assignment to the close, including
//! connects that never establish, under concurrency, without drift.

use std::{collections::BTreeMap, net::Ipv4Addr, thread, time::Duration};

use serde_json::json;
use socklb_tests::{
    cgroup::Cgroup,
    client::per_pod,
    hostile::ClearsCallbacks,
    manifests::{ServiceSpec, pod_ips},
    require_privileges,
    testbed::Testbed,
    wait_for,
};

#[test]
fn thirty_connections_at_once_count_thirty_and_closing_them_counts_zero() {
    require_privileges!();
    let (bed, spec) = Testbed::serving("cnt", 3, 3, |_| {}, &[]).unwrap();
    let vip = spec.target();
    let mut client = bed.client().unwrap();
    let outcomes = client.open(vip, 30).unwrap();
    assert!(outcomes.iter().all(|o| o.ok), "{outcomes:?}");
    // Counted from the moment of assignment: all 30 as soon as the connects return.
    assert_eq!(bed.counted_total().unwrap(), 30);
    // And the maps agree with what each pod holds open.
    bed.settle_at(30).unwrap();
    client.close_all().unwrap();
    bed.settle_at(0).unwrap();
}

#[test]
fn refused_and_abandoned_connects_leave_no_count_behind() {
    require_privileges!();
    let mut bed = Testbed::new("fail").unwrap();
    let ips = pod_ips(4, 3);
    // pod-1 serves; 10.244.4.2 has no listener (refused); SYNs to 10.244.4.3 are dropped, so
    // those connects are abandoned by the client's timeout while in SYN_SENT.
    bed.add_pods(&ips[..1], 8080).unwrap();
    bed.netns.add_address(ips[1]).unwrap();
    bed.netns.add_address(ips[2]).unwrap();
    let drop_rule = "*filter\n-A OUTPUT -d 10.244.4.3/32 -p tcp -j DROP\nCOMMIT\n";
    bed.netns
        .run_with_input("iptables-restore", &[], drop_rule)
        .unwrap();
    let mut spec = ServiceSpec::new("flaky", Ipv4Addr::new(10, 96, 4, 10), 80, 8080, &ips);
    spec.algorithm = Some("random"); // least-conn would send every connect to a failing pod
    bed.write_service(&spec).unwrap();
    bed.start_agent(&[]).unwrap();

    let mut client = bed.client().unwrap();
    let open = json!({"cmd": "open", "target": "10.96.4.10:80", "count": 60, "timeout_ms": 300});
    let outcomes = client.open_with(open).unwrap();
    let ok = outcomes.iter().filter(|o| o.ok).count() as u64;
    let refused = outcomes.iter().filter(|o| o.errno == Some(111)).count();
    let timed_out = outcomes
        .iter()
        .filter(|o| !o.ok && o.errno != Some(111))
        .count();
    assert!(
        ok > 0 && refused > 0 && timed_out > 0,
        "ok {ok}, refused {refused}, timed out {timed_out}"
    );

    // Only the established ones count, all on pod-1.
    let counts = bed.counted().unwrap();
    assert_eq!(
        counts,
        [
            ("pod-1".into(), ok),
            ("pod-2".into(), 0),
            ("pod-3".into(), 0)
        ]
    );
    client.close_all().unwrap();
    wait_for("counts to drop to zero", Duration::from_secs(5), || {
        Ok((bed.counted_total()? == 0).then_some(()))
    })
    .unwrap();
}

#[test]
fn no_drift_after_thousands_of_concurrent_open_close_cycles() {
    require_privileges!();
    let (bed, spec) = Testbed::serving("churn", 5, 3, |_| {}, &[]).unwrap();
    let vip = spec.target();

    // Five long-lived connections stay open throughout: the counts must come back to exactly
    // them, not to zero and not to "about" them.
    let mut holder = bed.client().unwrap();
    assert!(holder.open(vip, 5).unwrap().iter().all(|o| o.ok));

    // Two processes on two CPUs open, use and close connections as fast as they can.
    let cycles = 1500;
    for (ok, errors) in bed.churn(2, vip, cycles).unwrap().join() {
        assert_eq!(ok, cycles as u64, "{errors:?}");
    }
    bed.settle_at(5).unwrap();
    holder.close_all().unwrap();
    bed.settle_at(0).unwrap();
}

#[test]
fn counts_stay_exact_for_sockets_that_left_the_cgroup_across_a_restart_and_a_reused_id_starts_at_zero()
 {
    require_privileges!();
    let (mut bed, mut spec) = Testbed::serving("away", 50, 3, |_| {}, &[]).unwrap();
    let vip = spec.target();
    let mut client = bed.client().unwrap();
    assert!(client.open_one_by_one(vip, 6).unwrap().iter().all(|o| o.ok));
    bed.settle_at(6).unwrap();

    // The client process moves to another cgroup: its sockets stay socklb's (assigned,
    // counted), but nothing in the balanced cgroup leads to its network namespace any more.
    let elsewhere = Cgroup::new("away").unwrap();
    elsewhere.adopt(client.pid()).unwrap();
    bed.agent.as_mut().unwrap().restart().unwrap();
    bed.settle_at(6).unwrap();
    client.close_all().unwrap();
    bed.settle_at(0).unwrap();

    // pod-1 leaves and is forgotten once drained; pod-4 takes its backend id and must start
    // from zero: least-conn gives it its share at once.
    let ips = pod_ips(50, 4);
    spec.set_pods(&ips[1..3]);
    bed.write_service(&spec).unwrap();
    wait_for("pod-1 to be forgotten", Duration::from_secs(10), || {
        Ok((bed.agent().backends()?.len() == 2).then_some(()))
    })
    .unwrap();
    bed.add_pods(&ips[3..], 8080).unwrap();
    spec.set_pods(&ips[1..]);
    bed.write_service(&spec).unwrap();
    bed.agent().wait_backends("demo/web", &ips[1..]).unwrap();
    assert!(
        bed.agent()
            .backends()
            .unwrap()
            .iter()
            .all(|b| b.connections == 0)
    );
    let mut fresh = bed.client().unwrap();
    let spread = per_pod(&fresh.open_one_by_one(vip, 6).unwrap());
    assert_eq!(
        spread,
        BTreeMap::from([
            ("pod-2".into(), 2),
            ("pod-3".into(), 2),
            ("pod-4".into(), 2)
        ]),
        "the pod with the reused id got its share"
    );
    assert!(
        !bed.agent().log().contains("below zero"),
        "{}",
        bed.agent().log()
    );
}

#[test]
fn another_programs_callback_flags_cannot_leave_a_connection_counted() {
    require_privileges!();
    let (bed, spec) = Testbed::serving("hostile", 51, 3, |_| {}, &[]).unwrap();
    // A second sock_ops program on the same cgroup turns every socket's TCP callbacks off once
    // it is established, so socklb never hears that the connection closed.
    let _other = ClearsCallbacks::attach(bed.cgroup.path()).unwrap();
    let mut c = bed.client().unwrap();
    assert!(c.open(spec.target(), 12).unwrap().iter().all(|o| o.ok));
    bed.settle_at(12).unwrap();
    c.close_all().unwrap();
    bed.settle_at(0).unwrap();
    let (ok, errors) = c.churn(spec.target(), 300).unwrap();
    assert_eq!(ok, 300, "{errors:?}");
    bed.settle_at(0).unwrap();
}

#[test]
fn ten_thousand_cycles_while_backends_flip_and_the_agent_restarts_leave_every_count_at_zero() {
    require_privileges!();
    let mut bed = Testbed::new("flip").unwrap();
    let ips = pod_ips(52, 6);
    bed.add_pods(&ips, 8080).unwrap();
    let spec = ServiceSpec::new("web", Ipv4Addr::new(10, 96, 52, 10), 80, 8080, &ips[..3]);
    bed.write_service(&spec).unwrap();
    bed.start_agent(&[]).unwrap();
    let vip = spec.target();

    // The manifest flips between 3 and 6 backends every 100 ms for the whole run.
    let flipper = bed.flip_pods(
        &spec,
        [ips.clone(), ips[..3].to_vec()],
        Duration::from_millis(100),
        1_000,
    );
    // Four processes, 2,500 connect-request-close cycles each.
    let workers = bed.churn(4, vip, 2_500).unwrap();
    // Two agent restarts during the run.
    for _ in 0..2 {
        thread::sleep(Duration::from_millis(1_500));
        bed.agent.as_mut().unwrap().restart().unwrap();
    }
    for (ok, errors) in workers.join() {
        assert_eq!(ok, 2_500, "{errors:?}");
    }
    assert!(flipper.stop() >= 10);
    wait_for("every count back to zero", Duration::from_secs(10), || {
        let counted = bed.agent().backends()?;
        Ok(counted.iter().all(|b| b.connections == 0).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", bed.agent().backends()));
    assert!(
        !bed.agent().log().contains("below zero"),
        "{}",
        bed.agent().log()
    );
}

#[test]
fn a_restart_during_a_thousand_open_connections_and_churn_keeps_the_pods_counts() {
    require_privileges!();
    let (mut bed, spec) = Testbed::serving("k1", 53, 4, |_| {}, &[]).unwrap();
    let vip = spec.target();
    let mut holders: Vec<_> = (0..2).map(|_| bed.client().unwrap()).collect();
    for h in &mut holders {
        assert!(h.open(vip, 500).unwrap().iter().all(|o| o.ok));
    }
    let churn = bed.churn(1, vip, 3_000).unwrap();
    bed.agent.as_mut().unwrap().restart().unwrap();
    for (ok, errors) in churn.join() {
        assert_eq!(ok, 3_000, "{errors:?}");
    }
    bed.settle_at(1_000).unwrap();
    drop(holders);
    bed.settle_at(0).unwrap();
}

#[test]
fn a_repair_never_takes_a_count_below_zero_and_every_change_is_an_event() {
    require_privileges!();
    let (bed, spec) = Testbed::serving("adj", 5, 1, |_| {}, &[]).unwrap();
    let pin = &bed.agent().pin_path;
    let maps = lb_userspace::datapath::Maps::open_pinned(pin).unwrap();
    let tools = lb_userspace::datapath::Tools::open(pin).unwrap();
    let id = maps.backends.keys().next().unwrap().unwrap();
    let events = |maps: &lb_userspace::datapath::Maps| -> u64 {
        let e = maps.events().unwrap();
        assert_eq!(e.started, e.finished, "a change left under way");
        e.started
    };

    let before = events(&maps);
    let mut client = bed.client().unwrap();
    assert!(client.open(spec.target(), 2).unwrap().iter().all(|o| o.ok));
    assert_eq!(maps.connections(id), 2);
    assert_eq!(events(&maps), before + 2, "two assignments");

    // A decrement larger than the count is refused whole; one within it is applied.
    assert!(!tools.adjust_count(id, -3).unwrap());
    assert_eq!(maps.connections(id), 2);
    assert!(tools.adjust_count(id, 1).unwrap());
    assert!(tools.adjust_count(id, -1).unwrap());
    assert_eq!(maps.connections(id), 2);

    client.close_all().unwrap();
    bed.settle_at(0).unwrap();
    assert!(events(&maps) >= before + 4, "and two ends");
}

/// The recount's look at the sockets (`SocketIterator::count`) sees every socket that stays
/// open, however many others close and are freed around it. A listing read a buffer at a
/// time does not: resuming after a freed entry, the kernel skips a live one (the cause of a
/// restart once correcting a right count of 1,000 down to 999).
#[test]
fn a_counting_walk_sees_every_held_socket_while_others_are_freed_around_them() {
    require_privileges!();
    let mut bed = Testbed::new("walk").unwrap();
    let (held_ips, churn_ips) = (pod_ips(54, 2), pod_ips(55, 2));
    bed.add_pods(&held_ips, 8080).unwrap();
    bed.add_pods(&churn_ips, 8080).unwrap();
    let held = ServiceSpec::new("held", Ipv4Addr::new(10, 96, 54, 10), 80, 8080, &held_ips);
    let churned = ServiceSpec::new(
        "churned",
        Ipv4Addr::new(10, 96, 55, 10),
        80,
        8080,
        &churn_ips,
    );
    bed.write_service(&held).unwrap();
    bed.write_service(&churned).unwrap();
    bed.start_agent(&[]).unwrap();
    let mut holder = bed.client().unwrap();
    assert!(
        holder
            .open(held.target(), 1_000)
            .unwrap()
            .iter()
            .all(|o| o.ok)
    );

    let pin = &bed.agent().pin_path;
    let maps = lb_userspace::datapath::Maps::open_pinned(pin).unwrap();
    let tools = lb_userspace::datapath::Tools::open(pin).unwrap();
    let held_ids: Vec<u32> = maps
        .backends
        .iter()
        .map(Result::unwrap)
        .filter(|(_, b)| held_ips.iter().any(|ip| b.addr.ip() == *ip))
        .map(|(id, _)| id)
        .collect();
    assert_eq!(held_ids.len(), 2);

    let churn = bed.churn(2, churned.target(), 2_000).unwrap();
    let mut looks = 0;
    while looks < 2_000 && !churn.finished() {
        let found = tools.sockets.count().unwrap();
        let seen: u64 = held_ids
            .iter()
            .map(|id| found.get(id).copied().unwrap_or(0))
            .sum();
        assert_eq!(seen, 1_000, "look {looks}: {found:?}");
        looks += 1;
    }
    for (ok, errors) in churn.join() {
        assert_eq!(ok, 2_000, "{errors:?}");
    }
    assert!(looks >= 20, "only {looks} looks during the churn");
}
