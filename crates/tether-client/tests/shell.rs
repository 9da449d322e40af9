//! The I/O shell under paused time: it waits exactly what the machine decided, and the
//! failure cap ends the client. No server: attempts go to a closed loopback port.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tether_client::{Backoff, ClientBuilder, Event, State};

fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test(start_paused = true)]
async fn the_shell_waits_the_machines_delays_and_the_failure_cap_ends_it() {
    let url = format!("ws://127.0.0.1:{}/ws", closed_port());
    let mut c = ClientBuilder::new(url)
        .seed(5)
        .failure_cap(6)
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .unwrap();
    let mut pending = None;
    let mut waits = Vec::new();
    let mut errors = Vec::new();
    let fatal = loop {
        let e = tokio::time::timeout(Duration::from_secs(600), c.next_event())
            .await
            .expect("an event")
            .expect("not ended before closed");
        match e {
            Event::State(s) if s.state == State::Reconnecting => {
                pending = Some((tokio::time::Instant::now(), s.delay_ms.unwrap()));
            }
            Event::State(s) if s.state == State::Connecting => {
                if let Some((at, delay)) = pending.take() {
                    waits.push((at.elapsed(), delay));
                }
            }
            Event::State(s) if s.state == State::Closed => break s.fatal,
            Event::Error { code, .. } => errors.push(code),
            _ => {}
        }
    };
    assert!(fatal);
    assert_eq!(errors, ["failure_cap"]);
    assert_eq!(waits.len(), 5, "six attempts, five waits between them");
    for (i, (took, delay)) in waits.iter().enumerate() {
        let cap = Backoff::default().cap(u32::try_from(i + 1).unwrap());
        assert!(*delay <= cap, "wait {i}: {delay} over {cap}");
        // Virtual time: the shell slept exactly the machine's delay (to the ms).
        let took = u64::try_from(took.as_millis()).unwrap();
        assert!(
            took == *delay || took == delay + 1,
            "wait {i}: {took} ms for {delay}"
        );
    }
    assert!(
        c.next_event().await.is_none(),
        "the stream ends after closed"
    );
    let st = c.stats();
    assert_eq!((st.attempts, st.successes), (6, 0));
    assert_eq!(st.failures.values().sum::<u64>(), 6);
}
