//! kb-serve under overload and hostile clients, on loopback, with a fake backend (the model is
//! not the point): floods of clients, idle and slow-header connections, the connection limit,
//! idle keep-alive connections, clients leaving mid-request, graceful shutdown.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fake::{raise_fd_limit, rss_bytes, FakeServer};
use common::{answer, client};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A POST of `body` to `path` as raw HTTP/1.1.
fn raw_post(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: kb\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Reads one response (head and a `Content-Length` body) from `stream`; returns the head and
/// the body as text.
async fn read_response(stream: &mut TcpStream) -> (String, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = stream.read(&mut chunk).await.expect("read body");
                assert!(n > 0, "connection closed mid-body");
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
            return (head, body);
        }
        let n = stream.read(&mut chunk).await.expect("read head");
        assert!(n > 0, "connection closed before a response");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Waits until the peer closes `stream` (EOF or reset) and returns when.
async fn wait_closed(stream: &mut TcpStream) -> Instant {
    let mut chunk = [0u8; 1024];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Instant::now(),
            Ok(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_clients_gets_only_200_or_503_with_retry_after() {
    raise_fd_limit(4096);
    let server = FakeServer::start(
        Duration::from_millis(5),
        &[
            "--max_queue",
            "4",
            "--max_concurrent",
            "16",
            "--max_batch_size",
            "4",
            "--max_wait_ms",
            "0",
        ],
    )
    .await;
    let started = Instant::now();
    let barrier = Arc::new(tokio::sync::Barrier::new(256));
    let tasks: Vec<_> = (0..256)
        .map(|i| {
            let barrier = barrier.clone();
            let (path, body) = if i % 2 == 0 {
                ("/v1/keywords", json!({"query": format!("{i}번 질문")}))
            } else {
                ("/keyword_extract", json!({"prompt": format!("{i}번 질문")}))
            };
            let url = server.url(path);
            tokio::spawn(async move {
                // One client (so one connection) each.
                let c = client();
                barrier.wait().await;
                answer(c.post(url).json(&body).send().await.expect("answered")).await
            })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        let a = t.await.unwrap();
        match a.status {
            200 => ok += 1,
            503 => {
                refused += 1;
                assert_eq!(a.header("retry-after"), Some("1"));
                let e = a.error();
                assert!(
                    e.contains("--max_queue") || e.contains("--max_concurrent"),
                    "{e}"
                );
            }
            s => panic!("unexpected {s}: {}", String::from_utf8_lossy(&a.raw)),
        }
    }
    eprintln!(
        "256 clients: {ok} answered, {refused} refused in {:?}",
        started.elapsed()
    );
    assert!(ok >= 1 && refused >= 1, "{ok} answered, {refused} refused");
    let text = client()
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let count = |series: &str| common::metric_value(&text, series).unwrap_or(0.0);
    let counted = count("kb_requests_total{route=\"/v1/keywords\",status=\"503\"}")
        + count("kb_requests_total{route=\"/keyword_extract\",status=\"503\"}");
    assert_eq!(counted, refused as f64, "/metrics counts every 503");
    assert_eq!(count("kb_queue_depth"), 0.0);
    // Afterwards the server answers normally.
    let a = answer(
        client()
            .post(server.url("/v1/keywords"))
            .json(&json!({"query": "안녕하세요"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.raw));
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_and_concurrency_limits_hold_under_a_flood() {
    let server = FakeServer::start(
        Duration::from_millis(5),
        &[
            "--max_queue",
            "4",
            "--max_concurrent",
            "16",
            "--max_batch_size",
            "4",
            "--max_wait_ms",
            "0",
        ],
    )
    .await;
    let c = client();
    let url = server.url("/v1/keywords");
    let flood: Vec<_> = (0..128)
        .map(|i| {
            let (c, url) = (client(), url.clone());
            tokio::spawn(async move {
                let mut refused = 0;
                for _ in 0..4 {
                    let r = c
                        .post(&url)
                        .json(&json!({"query": format!("{i}")}))
                        .send()
                        .await;
                    refused += usize::from(r.expect("answered").status() == 503);
                }
                refused
            })
        })
        .collect();
    let (mut queue, mut in_flight, mut samples) = (0.0f64, 0.0f64, 0);
    while flood.iter().any(|t| !t.is_finished()) {
        let text = c
            .get(server.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        queue = queue.max(common::metric_value(&text, "kb_queue_depth").unwrap());
        in_flight =
            in_flight.max(common::metric_value(&text, "kb_keyword_requests_in_flight").unwrap());
        samples += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut refused = 0;
    for t in flood {
        refused += t.await.unwrap();
    }
    eprintln!(
        "{samples} samples: queue depth ≤ {queue}, in flight ≤ {in_flight}; {refused} of 512 refused"
    );
    assert!(samples >= 5, "the flood ended before it could be watched");
    assert!(queue <= 4.0, "queue depth {queue} over --max_queue 4");
    assert!(
        in_flight <= 16.0,
        "{in_flight} requests in flight over --max_concurrent 16"
    );
    assert!(refused > 0, "the flood never reached the limits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_header_connections_neither_block_others_nor_stay() {
    raise_fd_limit(4096);
    let header_timeout = Duration::from_millis(5000);
    let server = FakeServer::start(Duration::ZERO, &["--header_timeout_ms", "5000"]).await;
    let rss_before = rss_bytes();
    let connects = Instant::now();
    let connected = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // 250 connections that send nothing, 250 that dribble a request head one byte every 50 ms.
    let hostile: Vec<_> = (0..500)
        .map(|i| {
            let addr = server.addr;
            let connected = connected.clone();
            tokio::spawn(async move {
                let mut stream = TcpStream::connect(addr).await.expect("connect");
                connected.fetch_add(1, Ordering::Relaxed);
                let opened = Instant::now();
                if i % 2 == 0 {
                    return wait_closed(&mut stream).await - opened;
                }
                let head = format!(
                    "POST /v1/keywords HTTP/1.1\r\nHost: kb\r\nX-Slow: {}",
                    "a".repeat(4096)
                );
                let mut chunk = [0u8; 256];
                for byte in head.bytes() {
                    tokio::select! {
                        r = stream.read(&mut chunk) => {
                            if matches!(r, Ok(0) | Err(_)) {
                                return opened.elapsed();
                            }
                        }
                        () = tokio::time::sleep(Duration::from_millis(50)) => {
                            if stream.write_all(&[byte]).await.is_err() {
                                return opened.elapsed();
                            }
                        }
                    }
                }
                panic!("the whole head was dribbled without the connection being cut");
            })
        })
        .collect();
    // All of them are being served…
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut all_connected = None;
    loop {
        let open = server.metric("kb_open_connections").await;
        if all_connected.is_none() && connected.load(Ordering::Relaxed) == 500 {
            all_connected = Some(connects.elapsed());
        }
        if open >= 500.0 {
            eprintln!(
                "500 connected after {all_connected:?}, 500 open after {:?}",
                connects.elapsed()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the 500 connections were not accepted ({open} open, {} connected after {all_connected:?}, {} cut after {:?}; {} accepted, {} timed out)",
            connected.load(Ordering::Relaxed),
            hostile.iter().filter(|t| t.is_finished()).count(),
            connects.elapsed(),
            server.metric("kb_connections_total").await,
            server.metric("kb_header_timeouts_total").await,
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rss_loaded = rss_bytes();
    // …and a normal client is answered promptly meanwhile.
    let asked = Instant::now();
    let a = answer(
        client()
            .post(server.url("/v1/keywords"))
            .json(&json!({"query": "안녕하세요"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let latency = asked.elapsed();
    assert_eq!(a.status, 200);
    assert!(
        asked.duration_since(connects) < header_timeout && latency < Duration::from_millis(1500),
        "a normal request took {latency:?}, {:?} after the hostile connections opened",
        asked.duration_since(connects)
    );
    // Every hostile connection is cut after the header timeout.
    let mut cut = Vec::new();
    for t in hostile {
        cut.push(t.await.unwrap());
    }
    let (first, last) = (cut.iter().min().unwrap(), cut.iter().max().unwrap());
    eprintln!(
        "normal request: {latency:?}; hostile connections cut after {first:?}..{last:?}; \
         RSS {} MiB before, {} MiB with 500 connections",
        rss_before >> 20,
        rss_loaded >> 20
    );
    assert!(
        *first >= header_timeout - Duration::from_millis(500),
        "cut early: {first:?}"
    );
    assert!(
        *last <= header_timeout + Duration::from_secs(5),
        "cut late: {last:?}"
    );
    assert!(server.metric("kb_header_timeouts_total").await >= 500.0);
    assert!(server.metric("kb_open_connections").await <= 2.0);
    // 500 connections cost the process (server and clients together) a bounded amount.
    assert!(
        rss_loaded.saturating_sub(rss_before) < 64 << 20,
        "RSS grew by {} MiB with 500 connections",
        rss_loaded.saturating_sub(rss_before) >> 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_wait_in_the_backlog() {
    let server = FakeServer::start(
        Duration::ZERO,
        &["--max_connections", "4", "--header_timeout_ms", "30000"],
    )
    .await;
    // The readiness poll's connection may still be open: let it close.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(server.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let url = server.url("/v1/keywords");
    let waiting = tokio::spawn(async move {
        let asked = Instant::now();
        let a = answer(
            client()
                .post(url)
                .json(&json!({"query": "안녕하세요"}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        (a.status, asked.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !waiting.is_finished(),
        "a fifth connection was served at --max_connections 4"
    );
    let released = Instant::now();
    held.truncate(2);
    let (status, _) = waiting.await.unwrap();
    assert_eq!(status, 200);
    assert!(
        released.elapsed() < Duration::from_secs(2),
        "answered {:?} after connections closed",
        released.elapsed()
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(server.metric("kb_open_connections").await <= 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed_after_the_header_timeout() {
    let server = FakeServer::start(Duration::ZERO, &["--header_timeout_ms", "1000"]).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let get = b"GET /health HTTP/1.1\r\nHost: kb\r\n\r\n";
    stream.write_all(get).await.unwrap();
    let (head, body) = read_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.contains("ok"));
    assert!(
        !head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    // Kept alive: a second request within the timeout is served on the same connection.
    tokio::time::sleep(Duration::from_millis(400)).await;
    stream.write_all(get).await.unwrap();
    let (head, _) = read_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let answered = Instant::now();
    let closed = wait_closed(&mut stream).await - answered;
    assert!(
        closed >= Duration::from_millis(900) && closed < Duration::from_secs(4),
        "an idle keep-alive connection was closed after {closed:?} (header timeout 1 s)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_leaving_mid_request_leave_no_work_behind() {
    raise_fd_limit(4096);
    const CLIENTS: usize = 300;
    let server = FakeServer::start(
        Duration::from_millis(100),
        &[
            "--max_queue",
            "512",
            "--max_concurrent",
            "512",
            "--max_batch_size",
            "16",
            "--max_wait_ms",
            "0",
        ],
    )
    .await;
    let mut streams = Vec::new();
    for i in 0..CLIENTS {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        let body = json!({"query": format!("{i}번 질문입니다")}).to_string();
        s.write_all(&raw_post("/v1/keywords", &body)).await.unwrap();
        streams.push(s);
    }
    // Every request is queued or generating (a batch takes 31 steps of 100 ms)…
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let waiting = server.metric("kb_queue_depth").await as usize
            + server.stats.rows_now.load(Ordering::Acquire);
        if waiting == CLIENTS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {waiting} of {CLIENTS} requests queued"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let steps_before = server.stats.steps.load(Ordering::Relaxed);
    // …when every client disconnects.
    let left = Instant::now();
    drop(streams);
    let deadline = left + Duration::from_secs(10);
    loop {
        let dropped = server.metric("kb_dropped_requests_total").await;
        let queued = server.metric("kb_queue_depth").await;
        let in_flight = server.metric("kb_keyword_requests_in_flight").await;
        if dropped == CLIENTS as f64 && queued == 0.0 && in_flight == 0.0 && server.stats.idle() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dropped {dropped}, queued {queued}, in flight {in_flight}, worker idle {}",
            server.stats.idle()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let idle_after = left.elapsed();
    let steps_after = server.stats.steps.load(Ordering::Relaxed) - steps_before;
    eprintln!("{CLIENTS} clients left; worker idle after {idle_after:?}, {steps_after} more steps");
    assert_eq!(server.stats.answered_rows.load(Ordering::Relaxed), 0);
    // The batch being generated stopped at its next step; nothing else was generated (answering
    // every request would have taken {CLIENTS}/16 batches of 31 steps).
    assert!(
        steps_after <= 3,
        "{steps_after} decoding steps after the clients left"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        server.stats.steps.load(Ordering::Relaxed) - steps_before,
        steps_after
    );
    // The server still answers.
    let a = answer(
        client()
            .post(server.url("/v1/keywords"))
            .json(&json!({"query": "안녕하세요", "max_length": 3}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_requests_in_flight_and_closes_idle_connections() {
    let mut server = FakeServer::start(Duration::from_millis(20), &[]).await;
    // An idle kept-alive connection…
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: kb\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_response(&mut idle).await;
    assert!(head.starts_with("HTTP/1.1 200"));
    // …and three requests in flight (31 steps of 20 ms each).
    let tasks: Vec<_> = (0..3)
        .map(|i| {
            let url = server.url("/v1/keywords");
            tokio::spawn(async move {
                client()
                    .post(url)
                    .json(&json!({"query": format!("{i}번")}))
                    .send()
                    .await
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.metric("kb_keyword_requests_in_flight").await < 3.0 {
        assert!(
            Instant::now() < deadline,
            "the requests never got in flight"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stopping = Instant::now();
    server.begin_stop();
    let closed = wait_closed(&mut idle).await - stopping;
    assert!(
        closed < Duration::from_secs(1),
        "the idle connection stayed {closed:?}"
    );
    for t in tasks {
        let resp = t.await.unwrap().expect("an in-flight request is answered");
        assert_eq!(resp.status(), 200);
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["results"][0]["keywords"][0], "fake");
    }
    server.join().await.expect("serve returns Ok");
    assert!(
        TcpStream::connect(server.addr).await.is_err(),
        "still accepting"
    );
}
