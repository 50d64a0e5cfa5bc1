//! Chaos with real processes: 3 to 5 gateway nodes (`multifeed serve`) on
//! loopback, dialing each other in a chain or a star, take publishes over HTTP
//! every few milliseconds while a random node is killed with SIGKILL and
//! restarted, again and again. After the writes stop, every node must hold every
//! acknowledged message exactly once, and `verify` must be clean on every store.
//!
//! Seeded: the seed is printed; `CHAOS_SEED=<n>` replays a run's choices (the
//! processes' timing still varies). `CHAOS_SECS` sets how long the chaos lasts
//! (the soak script runs it for minutes), `CHAOS_TOPOLOGY=chain|star` picks one.

mod cli_common;

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use cli_common::*;
use rand::{Rng, SeedableRng, rngs::StdRng};

const TOPIC: &str = "chaos";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Topology {
    /// Node i dials node i-1, and node 0 dials node 1 too (a pair that dial each other).
    Chain,
    /// Every node dials node 0.
    Star,
}

/// The `--peer` targets of node `i`.
fn dials(topology: Topology, i: usize) -> Vec<usize> {
    match (topology, i) {
        (Topology::Chain, 0) => vec![1],
        (Topology::Chain, i) => vec![i - 1],
        (Topology::Star, 0) => vec![],
        (Topology::Star, _) => vec![0],
    }
}

struct Slot {
    gw: Gw,
    args: Vec<String>,
    http: String,
    node: Option<Node>,
}

impl Slot {
    fn start(&mut self) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.node = Some(self.gw.node(&args));
    }
}

/// Figures of one run, printed as one line.
#[derive(Debug, Default)]
struct Figures {
    nodes: usize,
    acked: usize,
    unacked: usize,
    kills: usize,
    lost: usize,
    duplicated: usize,
    convergence_ms: u128,
}

fn seed() -> u64 {
    std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

fn run(topology: Topology, seed: u64, chaos: Duration) -> Figures {
    println!("chaos {topology:?}: seed {seed} (replay with CHAOS_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let n = rng.gen_range(3..=5);
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), n);
    let peer_addrs: Vec<String> = (0..n)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let mut slots: Vec<Slot> = gws
        .into_iter()
        .enumerate()
        .map(|(i, gw)| {
            let http = format!("127.0.0.1:{}", free_port());
            let mut args = vec![
                "--listen".to_owned(),
                peer_addrs[i].clone(),
                "--http".into(),
                http.clone(),
            ];
            for j in dials(topology, i) {
                args.extend(["--peer".to_owned(), peer_addrs[j].clone()]);
            }
            Slot {
                gw,
                args,
                http,
                node: None,
            }
        })
        .collect();
    for slot in &mut slots {
        slot.start();
    }

    let mut figures = Figures {
        nodes: n,
        ..Figures::default()
    };
    // One publisher per node, every 10 ms, whether the node is up or not: a kill
    // lands in the middle of requests, whose messages count only if acknowledged.
    let writing = Arc::new(AtomicBool::new(true));
    let publishers: Vec<_> = slots
        .iter()
        .enumerate()
        .map(|(i, slot)| {
            let (http, writing) = (slot.http.clone(), writing.clone());
            std::thread::spawn(move || {
                let (mut acked, mut unacked) = (Vec::new(), 0usize);
                let mut seq = 0u64;
                while writing.load(Ordering::Relaxed) {
                    let tick = Instant::now();
                    seq += 1;
                    let payload = format!("n{i}-{seq}");
                    match publish(&http, TOPIC, &payload) {
                        Some(_) => acked.push(payload),
                        None => unacked += 1,
                    }
                    // Paces the writes, not a synchronisation.
                    if let Some(left) = Duration::from_millis(10).checked_sub(tick.elapsed()) {
                        std::thread::sleep(left);
                    }
                }
                (acked, unacked)
            })
        })
        .collect();
    let started = Instant::now();
    while started.elapsed() < chaos {
        // Paced kills: up 1-3 s, then a random node down for 0.1-1.5 s.
        std::thread::sleep(Duration::from_millis(rng.gen_range(1_000..3_000)));
        let i = rng.gen_range(0..n);
        if let Some(node) = slots[i].node.take() {
            node.running.kill9();
        }
        figures.kills += 1;
        std::thread::sleep(Duration::from_millis(rng.gen_range(100..1_500)));
        slots[i].start();
    }
    writing.store(false, Ordering::Relaxed);
    let mut acked: Vec<String> = Vec::new();
    for publisher in publishers {
        let (mut done, unacked) = publisher.join().expect("publisher");
        acked.append(&mut done);
        figures.unacked += unacked;
    }
    figures.acked = acked.len();

    // Writes have stopped: wait for every node to hold every acknowledged message.
    let converging = Instant::now();
    let https: Vec<String> = slots.iter().map(|s| s.http.clone()).collect();
    let all_there = |http: &str| {
        read_all(http, TOPIC).is_some_and(|held| {
            let held: std::collections::HashSet<String> = held.into_iter().collect();
            acked.iter().all(|p| held.contains(p))
        })
    };
    let converged = poll_until(Duration::from_secs(60), || {
        https.iter().all(|h| all_there(h))
    });
    figures.convergence_ms = converging.elapsed().as_millis();

    for (i, slot) in slots.iter().enumerate() {
        let held = read_all(&slot.http, TOPIC).expect("the node answers");
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for p in &held {
            *counts.entry(p.as_str()).or_default() += 1;
        }
        figures.duplicated += counts.values().filter(|c| **c > 1).count();
        let lost = acked
            .iter()
            .filter(|p| !counts.contains_key(p.as_str()))
            .count();
        figures.lost += lost;
        if lost > 0 {
            println!("node {i} lacks {lost} acknowledged messages");
        }
    }
    for slot in &mut slots {
        if let Some(node) = slot.node.take() {
            node.running.stop();
        }
    }
    for slot in &slots {
        slot.gw.verify();
    }
    println!(
        "chaos {topology:?} figures: nodes {} acked {} unacked {} kills {} lost {} duplicated {} convergence_ms {}",
        figures.nodes,
        figures.acked,
        figures.unacked,
        figures.kills,
        figures.lost,
        figures.duplicated,
        figures.convergence_ms
    );
    assert!(
        converged,
        "seed {seed}: the nodes did not converge within 60 s"
    );
    assert_eq!(figures.lost, 0, "seed {seed}: acknowledged messages lost");
    assert_eq!(figures.duplicated, 0, "seed {seed}: messages duplicated");
    assert!(figures.kills > 0 && figures.acked > 0);
    figures
}

fn chaos_secs() -> Duration {
    Duration::from_secs(
        std::env::var("CHAOS_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(15),
    )
}

fn wanted(topology: &str) -> bool {
    std::env::var("CHAOS_TOPOLOGY").map_or(true, |t| t == topology)
}

#[test]
fn chaos_chain_of_nodes_killed_and_restarted_loses_and_repeats_nothing() {
    if wanted("chain") {
        run(Topology::Chain, seed(), chaos_secs());
    }
}

#[test]
fn chaos_star_of_nodes_killed_and_restarted_loses_and_repeats_nothing() {
    if wanted("star") {
        run(Topology::Star, seed().wrapping_add(1), chaos_secs());
    }
}
