//! `--procs N`: the scenario re-executes this binary as N child processes, each
//! holding a share of the subscribers (one process holds at most ~19.9k sockets here).
//! A child prints tagged JSON lines on its stdout (`READY {…}`, `RESULT {…}`) and takes
//! orders on its stdin (`PUBLISHED`, `CLOSE`; EOF means the same). Only the parent
//! publishes and reads the server's CPU and memory.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};

use tokio::sync::mpsc;

struct Kid {
    child: Child,
    stdin: Option<ChildStdin>,
}

/// The children of one run; any still running when this is dropped are killed.
pub struct Children {
    kids: Vec<Kid>,
    rx: mpsc::UnboundedReceiver<(usize, Option<String>)>,
}

/// Subscriber indices of child `k` of `procs` out of `n`.
pub fn share(k: usize, procs: usize, n: usize) -> Vec<usize> {
    (k..n).step_by(procs.max(1)).collect()
}

impl Children {
    /// Starts `procs` copies of this process with the same arguments plus `--child K`.
    pub fn spawn(procs: usize) -> Result<Children, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        let (tx, rx) = mpsc::unbounded_channel();
        let mut out = Children {
            kids: Vec::new(),
            rx,
        };
        for k in 0..procs {
            let mut child = Command::new(&exe)
                .args(&args)
                .arg("--child")
                .arg(k.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|e| format!("spawning child {k}: {e}"))?;
            let stdout = child.stdout.take().ok_or("child without stdout")?;
            let stdin = child.stdin.take();
            out.kids.push(Kid { child, stdin });
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    match line {
                        Ok(l) => {
                            if tx.send((k, Some(l))).is_err() {
                                return;
                            }
                        }
                        Err(_) => break,
                    }
                }
                let _ = tx.send((k, None));
            });
        }
        Ok(out)
    }

    /// Waits until every child has printed one `TAG {json}` line; returns the JSON
    /// values in child order.
    pub async fn collect(
        &mut self,
        tag: &str,
        until: tokio::time::Instant,
    ) -> Result<Vec<serde_json::Value>, String> {
        let mut got: Vec<Option<serde_json::Value>> = vec![None; self.kids.len()];
        while got.iter().any(Option::is_none) {
            let (k, line) = match tokio::time::timeout_at(until, self.rx.recv()).await {
                Ok(Some(m)) => m,
                Ok(None) => return Err("children's output closed".into()),
                Err(_) => return Err(format!("timed out waiting for the children's {tag}")),
            };
            let Some(line) = line else {
                if got.get(k).is_some_and(Option::is_none) {
                    return Err(format!("child {k} exited before {tag}"));
                }
                continue;
            };
            let Some(body) = line.strip_prefix(tag).map(str::trim) else {
                eprintln!("child {k}: {line}");
                continue;
            };
            let v = serde_json::from_str(body).map_err(|e| format!("child {k} {tag}: {e}"))?;
            if let Some(slot) = got.get_mut(k) {
                *slot = Some(v);
            }
        }
        Ok(got.into_iter().flatten().collect())
    }

    /// Writes one line to every child's stdin.
    pub fn tell(&mut self, line: &str) {
        for kid in &mut self.kids {
            if let Some(s) = kid.stdin.as_mut() {
                let _ = writeln!(s, "{line}").and_then(|()| s.flush());
            }
        }
    }

    /// Closes the children's stdin and waits up to `grace` for them to exit.
    pub async fn finish(mut self, grace: std::time::Duration) {
        for kid in &mut self.kids {
            kid.stdin = None;
        }
        let until = std::time::Instant::now() + grace;
        for kid in &mut self.kids {
            while std::time::Instant::now() < until {
                if matches!(kid.child.try_wait(), Ok(Some(_)) | Err(_)) {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        // Drop kills whatever is left.
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for kid in &mut self.kids {
            kid.stdin = None;
            if let Ok(None) = kid.child.try_wait() {
                let _ = kid.child.kill();
                let _ = kid.child.wait();
            }
        }
    }
}

/// A child's stdin as lines (the channel closes at EOF).
pub fn stdin_lines() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(l) => {
                    if tx.send(l).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    rx
}
