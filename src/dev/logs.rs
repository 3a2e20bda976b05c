//! Prefixed, interleaved logs: every line of the nats-server, the sidecar and the app goes
//! to one sink with its source's prefix, whole lines at a time so sources never mix within
//! a line.

use std::io::Write;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

pub const NATS: &str = "[nats] ";
pub const SIDECAR: &str = "[sidecar] ";
pub const APP: &str = "[app] ";

/// Where every prefixed line goes (the terminal, or a test's buffer).
pub type Sink = Arc<Mutex<dyn Write + Send>>;

/// Writes `text`, line by line, each line behind `prefix`.
pub fn write_lines(sink: &Sink, prefix: &str, text: &str) {
    let mut out = String::with_capacity(text.len() + prefix.len());
    for line in text.lines() {
        out.push_str(prefix);
        out.push_str(line);
        out.push('\n');
    }
    let mut w = sink.lock().unwrap_or_else(|e| e.into_inner());
    let _ = w.write_all(out.as_bytes());
    let _ = w.flush();
}

/// Copies a child's output to the sink line by line, until it ends.
pub fn pump(sink: Sink, prefix: &'static str, from: impl AsyncRead + Unpin + Send + 'static) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = BufReader::new(from).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            write_lines(&sink, prefix, &line);
        }
    })
}

/// A `tracing` writer (`MakeWriter`) for the in-process sidecar: each event, formatted
/// whole, goes to the sink behind `[sidecar] `.
#[derive(Clone)]
pub struct SidecarWriter(pub Sink);

impl Write for SidecarWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        write_lines(&self.0, SIDECAR, &String::from_utf8_lossy(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for SidecarWriter {
    type Writer = SidecarWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default, Clone)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_gets_its_prefix() {
        let buf = Buf::default();
        let sink: Sink = Arc::new(Mutex::new(buf.clone()));
        write_lines(&sink, APP, "one\ntwo\n");
        let mut w = SidecarWriter(sink.clone());
        w.write_all(b"INFO started\n").unwrap();
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(out, "[app] one\n[app] two\n[sidecar] INFO started\n");
    }
}
