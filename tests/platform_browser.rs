//! The platform's page in a real browser (issue 15): `scripts/demo --serve` runs the
//! platform, headless Chromium (Debian's package, installed by scripts/chromium-env, which
//! scripts/test runs first) opens gateway's page, clicks Start and waits for the token
//! stream and the workflow's end (tests/node/platform-browser.cjs, over the DevTools
//! protocol). What the page shows is checked against what the demo's tap saw on NATS, and
//! the screenshot is saved to target/platform/page.png
//! (`NATSBRIDGE_UPDATE_SCREENSHOT=1` also writes docs/platform-page.png, the README's).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Chromium from CHROMIUM_BIN or PATH; missing is a failure, never a skip.
fn chromium() -> PathBuf {
    if let Ok(bin) = std::env::var("CHROMIUM_BIN") {
        return bin.into();
    }
    let out = Command::new("sh").args(["-c", "command -v chromium"]).output().unwrap();
    assert!(out.status.success(), "chromium is not installed: run scripts/chromium-env (scripts/test does)");
    String::from_utf8(out.stdout).unwrap().trim().into()
}

/// The demo, stopped (SIGTERM: it stops its processes) when dropped.
struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

fn serve(work: &Path) -> (Demo, String) {
    let log = std::fs::File::create(work.join("demo.log")).unwrap();
    let child = Command::new(Path::new(ROOT).join("scripts/demo"))
        .arg("--serve")
        .env("PLATFORM_WORK", work)
        .env("NATSBRIDGE_BIN", env!("CARGO_BIN_EXE_natsbridge"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("run scripts/demo --serve");
    let mut demo = Demo(child);
    let started = Instant::now();
    loop {
        if let Ok(url) = std::fs::read_to_string(work.join("gateway.url")) {
            return (demo, url.trim().to_owned());
        }
        let log = || std::fs::read_to_string(work.join("demo.log")).unwrap_or_default();
        assert!(demo.0.try_wait().unwrap().is_none(), "scripts/demo --serve exited:\n{}", log());
        assert!(started.elapsed() < Duration::from_secs(120), "the platform did not come up:\n{}", log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_page_starts_a_workflow_and_shows_its_tokens_and_log() {
    let chromium = chromium();
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let (_demo, url) = serve(work);
    let modules = Command::new(Path::new(ROOT).join("scripts/node-env")).output().unwrap();
    assert!(modules.status.success(), "{}", String::from_utf8_lossy(&modules.stderr));
    let shot = Path::new(ROOT).join("target/platform/page.png");
    let _ = std::fs::remove_file(&shot);
    let out = Command::new("node")
        .arg(Path::new(ROOT).join("tests/node/platform-browser.cjs"))
        .args([chromium.as_os_str(), url.as_ref(), shot.as_os_str()])
        .env("NODE_PATH", String::from_utf8(modules.stdout).unwrap().trim())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();

    let wf = shown["workflow"].as_str().unwrap();
    assert_eq!(shown["status"], "completed", "{shown:#}");
    // What the tap saw on NATS for this workflow: the agent's answer, and the execution events.
    let text = std::fs::read_to_string(work.join("hops.jsonl")).unwrap();
    let hops: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).filter(|h: &Value| h["workflow"] == wf).collect();
    let completed = hops.iter().find(|h| h["subject"] == "agent.execution.completed").expect("the agent completed on NATS");
    let answer: Value = serde_json::from_str(completed["data"].as_str().unwrap()).unwrap();
    assert_eq!(shown["tokens"], answer["answer"], "the page shows every token, in order, once");
    let events: Vec<&str> = hops
        .iter()
        .map(|h| h["subject"].as_str().unwrap())
        .filter(|s| ["workflow.execution.", "agent.execution.", "tool.execution."].iter().any(|p| s.starts_with(p)))
        .collect();
    let mut log: Vec<&str> = shown["log"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert_eq!(log.last(), Some(&"workflow.execution.completed"), "{shown:#}");
    let mut sorted = events.clone();
    sorted.sort_unstable();
    log.sort_unstable();
    assert_eq!(log, sorted, "the page's execution log is the workflow's events");

    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a real screenshot ({} bytes)", png.len());
    if std::env::var_os("NATSBRIDGE_UPDATE_SCREENSHOT").is_some() {
        std::fs::write(Path::new(ROOT).join("docs/platform-page.png"), &png).unwrap();
    }
}
