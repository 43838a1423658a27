//! Readings: percentiles, and what `/proc`, chorus's `/api/stats` and Redis
//! say.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::{json, Value};

pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

pub fn summary(mut samples: Vec<f64>) -> Value {
    samples.sort_by(f64::total_cmp);
    json!({
        "n": samples.len(),
        "p50": percentile(&samples, 0.5),
        "p90": percentile(&samples, 0.9),
        "p99": percentile(&samples, 0.99),
        "max": samples.last().copied().unwrap_or(f64::NAN),
    })
}

/// Server CPU time (user + system) in seconds, from /proc/PID/stat.
pub fn cpu_seconds(pid: u32) -> Result<f64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| e.to_string())?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or("odd /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the full line: 12 and 13 here.
    let hz = rustix::param::clock_ticks_per_second() as f64;
    Ok((ticks(11) + ticks(12)) / hz)
}

/// CPU seconds of the server's threads by role: thread
/// names without their number (`chorus-conn`, `chorus-cache`, …), from
/// /proc/PID/task. Threads that ended in between are missing from it.
pub fn cpu_by_thread(pid: u32) -> Result<std::collections::BTreeMap<String, f64>, String> {
    let mut by_role = std::collections::BTreeMap::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| e.to_string())?;
    for task in tasks.flatten() {
        // schedstat's first field is the time on a CPU in nanoseconds, far
        // finer than stat's clock ticks, which a short-lived share of many
        // threads would round away.
        let (Ok(name), Ok(schedstat)) = (
            std::fs::read_to_string(task.path().join("comm")),
            std::fs::read_to_string(task.path().join("schedstat")),
        ) else {
            continue;
        };
        let role = name
            .trim()
            .trim_end_matches(|c: char| c.is_ascii_digit() || c == '-');
        let nanos: f64 = schedstat
            .split_whitespace()
            .next()
            .and_then(|f| f.parse().ok())
            .unwrap_or(0.0);
        *by_role.entry(role.to_owned()).or_insert(0.0) += nanos / 1e9;
    }
    Ok(by_role)
}

/// Commands a Redis has processed so far (`INFO stats`).
pub fn redis_commands(url: &str) -> Result<u64, String> {
    let mut conn = redis::Client::open(url)
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
        .map_err(|e| format!("redis: {e}"))?;
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query(&mut conn)
        .map_err(|e| format!("redis INFO: {e}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| "redis INFO has no total_commands_processed".into())
}

/// Resident set size in KiB, from /proc/PID/status.
pub fn rss_kib(pid: u32) -> Result<f64, String> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| "no VmRSS".into())
}

/// chorus's `/api/stats`.
pub fn stats(addr: SocketAddr) -> Result<Value, String> {
    get_json(addr, "/api/stats")
}

/// `GET path` over a fresh connection; the JSON body of the answer, which
/// ends when the server closes the connection.
pub fn get_json(addr: SocketAddr, path: &str) -> Result<Value, String> {
    use std::io::{Read, Write};
    let mut tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(|e| e.to_string())?;
    let mut body = String::new();
    tcp.read_to_string(&mut body).map_err(|e| e.to_string())?;
    let json = body.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(json).map_err(|e| format!("GET {path} from {addr}: {e}"))
}
