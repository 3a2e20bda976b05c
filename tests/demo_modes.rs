//! `scripts/demo-modes`, the tour of the modes the README gives a new user: nats-server,
//! two legacy apps with a sidecar each, and one call per mode. Each call must answer the
//! way the tour says it does, so the tour cannot rot into a script that runs and shows
//! errors.

use std::path::Path;
use std::process::{Command, Stdio};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// One step of the tour: its title (after `▶ `), and what the call answered: the body
/// lines, then the status from the `← HTTP nnn` line.
struct Step {
    title: String,
    body: String,
    status: u16,
}

fn steps(out: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in out.lines() {
        if let Some(title) = line.strip_prefix("▶ ") {
            current = Some((title.to_owned(), String::new()));
        } else if let Some(code) = line.trim().strip_prefix("← HTTP ") {
            let (title, body) = current.take().expect("a status line outside a step");
            steps.push(Step { title, body, status: code.parse().expect("a status code") });
        } else if let Some((_, body)) = current.as_mut() {
            body.push_str(line.trim());
            body.push('\n');
        }
    }
    steps
}

#[test]
fn the_modes_tour_answers_each_call_as_it_says() {
    let out = Command::new(Path::new(ROOT).join("scripts/demo-modes"))
        .env("NATSBRIDGE_BIN", env!("CARGO_BIN_EXE_natsbridge"))
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/demo-modes");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "scripts/demo-modes failed:\n{text}");

    let steps = steps(&String::from_utf8_lossy(&out.stdout));
    let got: Vec<(&str, u16)> = steps.iter().map(|s| (s.title.split(':').next().unwrap(), s.status)).collect();
    assert_eq!(
        got,
        [
            ("request mode", 201),
            ("the same call, the way an app with HTTP_PROXY makes it (absolute form)", 201),
            ("jetstream mode", 202),
            ("the retry with the same Idempotency-Key is deduplicated by the stream", 202),
            ("tunnel mode", 200),
            ("a capture that is not a single subject token is refused (no wildcard injection)", 400),
            ("nobody answers this subject", 503),
        ],
        "{text}"
    );
    let json = |s: &Step| -> serde_json::Value {
        // The apps print what they saw to the same output (`[agent app] …`): the answer is
        // the line that is a JSON document.
        let line = s.body.lines().rev().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("{}: no JSON body:\n{text}", s.title));
        serde_json::from_str(line).unwrap_or_else(|e| panic!("{}: {e}:\n{text}", s.title))
    };

    // Request mode reached the agent app with the captured id, by Host and by proxy form.
    for (step, id, task) in [(&steps[0], 7, "summarise"), (&steps[1], 8, "plan")] {
        let body = json(step);
        assert_eq!(body["service"], "agent", "{text}");
        assert_eq!(body["path"], format!("/agents/{id}/execute"), "{text}");
        assert!(body["received"].as_str().unwrap().contains(task), "{text}");
    }
    // The stream stored the first publish, and the retry is the same message.
    let (first, retry) = (json(&steps[2]), json(&steps[3]));
    assert_eq!((&first["stream"], &first["duplicate"]), (&"WORKFLOW".into(), &false.into()), "{text}");
    assert_eq!((&retry["seq"], &retry["duplicate"]), (&first["seq"], &true.into()), "{text}");
    // The tunnel replayed the whole request: method, path and query.
    let tunnel = json(&steps[4]);
    assert_eq!((&tunnel["method"], &tunnel["path"]), (&"PATCH".into(), &"/v1/tools/grep?verbose=1".into()), "{text}");
    // The refusals are problem documents.
    for step in &steps[5..] {
        assert_eq!(json(step)["status"], step.status, "{}: {text}", step.title);
    }
}
