//! Measurements for `make bench`, taken from inside a network namespace.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::sandbox::in_netns;

/// One-byte request/response transactions per second on one connection to a TCP echo server
/// (netperf's TCP_RR).
pub fn tcp_rr(netns: &str, target: SocketAddr, seconds: u64) -> f64 {
    in_netns(netns, || {
        let mut stream = TcpStream::connect(target).expect("connect to the echo server");
        stream.set_nodelay(true).expect("nodelay");
        let mut byte = [0u8; 1];
        let started = Instant::now();
        let mut transactions = 0u64;
        while started.elapsed() < Duration::from_secs(seconds) {
            stream.write_all(b"x").expect("send");
            stream.read_exact(&mut byte).expect("receive");
            transactions += 1;
        }
        transactions as f64 / started.elapsed().as_secs_f64()
    })
}

/// New connections per second, each with a one-byte exchange (netperf's TCP_CRR).
pub fn tcp_crr(netns: &str, target: SocketAddr, seconds: u64) -> f64 {
    in_netns(netns, || {
        let started = Instant::now();
        let mut connections = 0u64;
        let mut byte = [0u8; 1];
        while started.elapsed() < Duration::from_secs(seconds) {
            let mut stream = TcpStream::connect(target).expect("connect");
            stream.set_nodelay(true).expect("nodelay");
            stream.write_all(b"x").expect("send");
            stream.read_exact(&mut byte).expect("receive");
            connections += 1;
        }
        connections as f64 / started.elapsed().as_secs_f64()
    })
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}
