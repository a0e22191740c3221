//! Measurements for `make bench`, taken from inside a network namespace.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
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

/// Lets a namespace's clients open tens of thousands of short connections: TIME_WAIT ports are
/// reused and the whole port range is used.
pub fn prepare_short_connections(netns: &str) -> Result<(), String> {
    for (key, value) in [
        ("net.ipv4.tcp_tw_reuse", "1"),
        ("net.ipv4.ip_local_port_range", "1024 65535"),
    ] {
        weft_sandbox::host::sysctl_in(netns, key, value).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// New connections per second and their median latency, from a non-forking client: each
/// iteration connects, sends one byte, reads it back and closes with a reset (SO_LINGER 0, so
/// no TIME_WAIT is left behind); the latency is that of connect + request. Runs in `netns`.
pub fn connect_rate_and_latency(
    netns: &str,
    target: SocketAddr,
    seconds: u64,
) -> Result<(f64, Duration), String> {
    in_netns(netns, || connect_loop(target, seconds))
}

fn connect_loop(target: SocketAddr, seconds: u64) -> Result<(f64, Duration), String> {
    let limit = Duration::from_secs(seconds);
    let mut latencies = Vec::with_capacity(1 << 16);
    let mut byte = [0u8; 1];
    let started = Instant::now();
    loop {
        let begun = Instant::now();
        if begun - started >= limit {
            break;
        }
        let mut stream =
            TcpStream::connect(target).map_err(|e| format!("connect to {target}: {e}"))?;
        stream
            .set_nodelay(true)
            .and_then(|()| stream.write_all(b"x"))
            .and_then(|()| stream.read_exact(&mut byte))
            .map_err(|e| format!("exchange with {target}: {e}"))?;
        latencies.push(begun.elapsed());
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: a valid socket and a correctly sized option value.
        unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
    }
    let elapsed = started.elapsed();
    if latencies.is_empty() {
        return Err(format!("no connection to {target} completed"));
    }
    latencies.sort_unstable();
    Ok((
        latencies.len() as f64 / elapsed.as_secs_f64(),
        latencies[latencies.len() / 2],
    ))
}

/// Tells this executable, started again by [`connect_rate_and_latency_in`] or
/// [`wait_until_connectable_in`], what to do instead of its `main`.
const CLIENT_TASK: &str = "WEFT_BENCH_CLIENT_TASK";

/// Like [`connect_rate_and_latency`], but from a process of its own in `netns` and `cgroup`, as
/// a pod's process: hooks Weft attaches to a node's cgroup (socket-level load balancing) see
/// only processes in the pods' cgroups, which a thread of this process is not. The process is
/// this executable again, whose `main` must call [`run_client_task_if_asked`] first.
pub fn connect_rate_and_latency_in(
    netns: &str,
    cgroup: Option<&Path>,
    target: SocketAddr,
    seconds: u64,
) -> Result<(f64, Duration), String> {
    let answer = client_task(netns, cgroup, &format!("measure {target} {seconds}"))?;
    let mut words = answer.split_whitespace();
    let mut number = || -> Result<f64, String> {
        words
            .next()
            .and_then(|word| word.parse().ok())
            .ok_or_else(|| format!("unreadable answer from the client: {answer:?}"))
    };
    let (rate, nanos) = (number()?, number()?);
    Ok((rate, Duration::from_nanos(nanos as u64)))
}

/// Tries to exchange a byte with `target` every 20 ms from a process in `netns` and `cgroup`
/// (see [`connect_rate_and_latency_in`]) until it works, for at most `timeout`; how long that
/// took.
pub fn wait_until_connectable_in(
    netns: &str,
    cgroup: Option<&Path>,
    target: SocketAddr,
    timeout: Duration,
) -> Result<Duration, String> {
    let answer = client_task(
        netns,
        cgroup,
        &format!("wait {target} {}", timeout.as_millis()),
    )?;
    answer
        .trim()
        .parse()
        .map(Duration::from_nanos)
        .map_err(|_| format!("unreadable answer from the client: {answer:?}"))
}

fn client_task(netns: &str, cgroup: Option<&Path>, task: &str) -> Result<String, String> {
    let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
    let mut command = Command::new(exe);
    command
        .env(CLIENT_TASK, task)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    let output = weft_sandbox::host::in_namespaces(&mut command, Some(netns), cgroup)
        .map_err(|e| e.to_string())?
        .output()
        .map_err(|e| format!("starting the client: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "client `{task}` in {netns} failed ({})",
            output.status
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// For a bench's `main`, first thing: when this process was started as a client by
/// [`connect_rate_and_latency_in`] or [`wait_until_connectable_in`] (already in its namespace
/// and cgroup), does that, prints the result and exits.
pub fn run_client_task_if_asked() {
    let Ok(task) = std::env::var(CLIENT_TASK) else {
        return;
    };
    let words: Vec<&str> = task.split_whitespace().collect();
    let result = match words[..] {
        ["measure", target, seconds] => target
            .parse()
            .map_err(|e| format!("{target}: {e}"))
            .and_then(|target| connect_loop(target, seconds.parse().map_err(|e| format!("{e}"))?))
            .map(|(rate, latency)| format!("{rate} {}", latency.as_nanos())),
        ["wait", target, millis] => target
            .parse()
            .map_err(|e| format!("{target}: {e}"))
            .and_then(|target| {
                let timeout = Duration::from_millis(millis.parse().map_err(|e| format!("{e}"))?);
                wait_until_connectable(target, timeout)
            })
            .map(|took| took.as_nanos().to_string()),
        _ => Err(format!("unknown client task {task:?}")),
    };
    match result {
        Ok(answer) => {
            println!("{answer}");
            std::process::exit(0);
        }
        Err(error) => {
            eprintln!("client: {error}");
            std::process::exit(1);
        }
    }
}

fn wait_until_connectable(target: SocketAddr, timeout: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        let exchanged = TcpStream::connect_timeout(&target, Duration::from_millis(200))
            .and_then(|mut stream| {
                stream.set_read_timeout(Some(Duration::from_millis(500)))?;
                stream.write_all(b"x")?;
                let mut byte = [0u8; 1];
                stream.read_exact(&mut byte)
            })
            .is_ok();
        if exchanged {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            return Err(format!("{target} did not answer within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// The `p`th percentile (nearest rank) of `values`; 0 when there are none.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
