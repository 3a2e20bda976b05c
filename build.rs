//! Lays out the release binary's `.text` with the functions a serving sidecar runs first
//! (`link/text-order.txt`, written by `scripts/text-order`; issue 14).
//!
//! Why: the kernel maps a binary's code 64 KB around each page a process touches, and the
//! ~3 MB of code a sidecar runs is spread over ~14 MB of `.text`. Without an order, ~10 MB of
//! code is resident (counted in `VmRSS`); with the run code packed together, about what runs.
//! The list is a layout hint only: a name it does not find (an upgraded dependency, a renamed
//! function) is skipped, so a stale list costs memory, never correctness.
//!
//! Only where the linker is known to be LLD, which takes `--symbol-ordering-file`: release
//! builds for x86_64-unknown-linux-gnu with rustc ≥ 1.90 (its default linker is the bundled
//! `rust-lld`) and no linker chosen by the user. `NATSBRIDGE_TEXT_ORDER=off` turns it off.

use std::env;
use std::path::Path;
use std::process::Command;

const ORDER_FILE: &str = "link/text-order.txt";

fn main() {
    println!("cargo:rerun-if-changed={ORDER_FILE}");
    println!("cargo:rerun-if-env-changed=NATSBRIDGE_TEXT_ORDER");
    if env::var("NATSBRIDGE_TEXT_ORDER").as_deref() == Ok("off") {
        return;
    }
    if env::var("PROFILE").as_deref() != Ok("release")
        || env::var("TARGET").as_deref() != Ok("x86_64-unknown-linux-gnu")
        || !links_with_bundled_lld()
    {
        return;
    }
    let dir = env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let file = Path::new(&dir).join(ORDER_FILE);
    if !file.is_file() {
        println!("cargo:warning={ORDER_FILE} is missing: the binary is linked in the default order");
        return;
    }
    println!("cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}", file.display());
    // A stale name is expected after any dependency upgrade; one warning per name would bury
    // the build's real warnings.
    println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
}

/// rustc ≥ 1.90 links x86_64-unknown-linux-gnu with its bundled LLD unless the user picked a
/// linker (a configured `linker`, or linker flags in RUSTFLAGS); GNU ld would reject the flag.
fn links_with_bundled_lld() -> bool {
    if env::var_os("RUSTC_LINKER").is_some() {
        return false;
    }
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if ["linker", "link-self-contained", "fuse-ld"].iter().any(|f| flags.contains(f)) {
        return false;
    }
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(out) = Command::new(rustc).arg("-vV").output() else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(release) = text.lines().find_map(|l| l.strip_prefix("release: ")) else {
        return false;
    };
    let mut parts = release.split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (1, 90)
}
