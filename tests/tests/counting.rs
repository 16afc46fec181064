//! Live connection counts: exact from the moment of assignment to the close, including
//! connects that never establish, under concurrency, without drift.

use std::{net::Ipv4Addr, thread, time::Duration};

use serde_json::json;
use socklb_tests::{
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
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let mut c = bed.client().unwrap();
            thread::spawn(move || c.churn(vip, cycles).unwrap())
        })
        .collect();
    for w in workers {
        let (ok, errors) = w.join().unwrap();
        assert_eq!(ok, cycles as u64, "{errors:?}");
    }
    bed.settle_at(5).unwrap();
    holder.close_all().unwrap();
    bed.settle_at(0).unwrap();
}
