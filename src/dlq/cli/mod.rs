//! `natsbridge dlq`: operator tooling over the dead-letter stream, safe to run while
//! sidecars are publishing to it.
//!
//! - `list` counts dead letters per route and reason, with their age;
//! - `show` prints each one: why it died, where it came from, a payload preview;
//! - `replay` republishes each one to its original subject with JetStream and deletes the
//!   dead letter only once the replay is acked;
//! - `purge` deletes them (only with `--yes`).
//!
//! Reads stream through the dead-letter stream with an ephemeral ordered consumer, from the
//! first sequence of `--seq` up to the stream's last sequence when the command started (dead
//! letters that arrive meanwhile are left for the next run), headers only where the payload
//! is not needed. Nothing is held in memory but the current message, plus the selected
//! sequence numbers for `replay` and `purge`.
//!
//! The selection and formatting logic is pure and unit-tested here; the commands are tested
//! end to end in `tests/dlq_cli.rs`.
//!
//! Owns: `args` (the clap types), `scan` (selecting and reading dead letters), `render`
//! (what is printed), `commands` (the four commands, the command-line edge where errors
//! become `anyhow` and exit codes). May call `config`, `nats::connection` and the dead-letter
//! header names and [`Publisher`](crate::dlq::Publisher) in `crate::dlq`.

mod args;
mod commands;
mod render;
mod scan;

pub use args::{Command, FilterArgs, ListArgs, NatsArgs, PurgeArgs, ReplayArgs, Selection, ShowArgs};
pub use commands::{replay_headers, replay_msg_id, REPLAY_OF};
pub use render::{age, format_age, format_size, preview, progress_line, render_letter, Stat, Summary, Tally};
pub use scan::{parse_seq_range, unknown_route_warning, Filter, Letter, Scanner, SeqRange};

use crate::nats::connection::EnvLookup;

/// Runs a `natsbridge dlq` command; the process exit code.
pub async fn main(cmd: Command, env: EnvLookup<'_>) -> i32 {
    let result = match cmd {
        Command::List(a) => commands::list(a, env).await,
        Command::Show(a) => commands::show(a, env).await,
        Command::Replay(a) => commands::replay(a, env).await,
        Command::Purge(a) => commands::purge(a, env).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}
