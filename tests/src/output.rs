//! The console of a test host run and the markers in it.
//!
//! Lines are cleaned of terminal escape sequences and control characters. A line is a marker when
//! it starts with `HOST ` or `GUEST `: `<SOURCE> <key> <value...>`. A section is the part of the
//! console between `HOST begin <name>` and `HOST end <name>` (one rvmm run).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How many console lines a failure message shows.
const CONTEXT_LINES: usize = 80;

/// One console line and when it arrived, counted from the start of the run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// Time since the test host was started.
    pub at: Duration,
    /// The text, without escape sequences, control characters and line ending.
    pub text: String,
}

/// How the test host run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunEnd {
    /// QEMU exited with this status (0 after the test host powered off).
    Exited(i32),
    /// The run outlived its timeout and was killed.
    TimedOut,
    /// The test host's heartbeat stopped (it froze) and `resources/testhost-watch.py` ended it.
    Froze,
    /// The test host script was killed by a signal.
    Killed,
}

/// Who printed a marker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The test host (`HOST ...`).
    Host,
    /// An rvmm guest (`GUEST ...`).
    Guest,
}

impl Source {
    fn prefix(self) -> &'static str {
        match self {
            Source::Host => "HOST",
            Source::Guest => "GUEST",
        }
    }
}

/// One `<SOURCE> <key> <value...>` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Marker<'a> {
    /// Who printed it.
    pub source: Source,
    /// The first word after the source.
    pub key: &'a str,
    /// The rest of the line after the key, trimmed.
    pub value: &'a str,
}

impl<'a> Marker<'a> {
    /// Parses a cleaned console line; `None` if it is not a marker.
    pub fn parse(line: &'a str) -> Option<Marker<'a>> {
        let line = line.trim_start();
        let (source, rest) = if let Some(rest) = line.strip_prefix("HOST ") {
            (Source::Host, rest)
        } else if let Some(rest) = line.strip_prefix("GUEST ") {
            (Source::Guest, rest)
        } else {
            return None;
        };
        let rest = rest.trim_start();
        let (key, value) = rest.split_once(' ').unwrap_or((rest, ""));
        if key.is_empty() {
            return None;
        }
        Some(Marker {
            source,
            key,
            value: value.trim(),
        })
    }

    /// The whitespace-separated words of the value.
    pub fn words(&self) -> impl Iterator<Item = &'a str> {
        self.value.split_whitespace()
    }

    /// The `index`th word of the value.
    pub fn word(&self, index: usize) -> Option<&'a str> {
        self.words().nth(index)
    }

    /// The value of a `name=value` word, e.g. `field("driver")` of `0000:01:00.0 driver=nvme`.
    pub fn field(&self, name: &str) -> Option<&'a str> {
        self.words().find_map(|word| {
            word.split_once('=')
                .filter(|(key, _)| *key == name)
                .map(|(_, value)| value)
        })
    }

    /// The value as an unsigned number (the first word).
    pub fn as_u64(&self) -> Option<u64> {
        self.word(0)?.parse().ok()
    }
}

/// Removes terminal escape sequences (CSI `ESC [ ... final` and two-byte `ESC x`) and control
/// characters other than tab from a console line.
pub(crate) fn clean_line(raw: &str) -> String {
    let mut text = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                if chars.next_if_eq(&'[').is_some() {
                    // Parameters and intermediates up to the final byte (0x40..=0x7e).
                    for c in chars.by_ref() {
                        if ('\u{40}'..='\u{7e}').contains(&c) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\t' => text.push(c),
            c if c.is_control() => {}
            c => text.push(c),
        }
    }
    text
}

/// Everything a test host run printed, with how it ended.
#[derive(Clone, Debug)]
pub struct TestHostOutput {
    name: String,
    log_path: PathBuf,
    lines: Vec<Line>,
    end: RunEnd,
    elapsed: Duration,
}

impl TestHostOutput {
    /// Wraps the console of a finished run.
    pub fn new(
        name: &str,
        log_path: &Path,
        lines: Vec<Line>,
        end: RunEnd,
        elapsed: Duration,
    ) -> Self {
        TestHostOutput {
            name: name.to_string(),
            log_path: log_path.to_path_buf(),
            lines,
            end,
            elapsed,
        }
    }

    /// The run's name (the log is `build/logs/<name>.log`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The saved console log.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// All console lines.
    pub fn lines(&self) -> &[Line] {
        &self.lines
    }

    /// How the run ended.
    pub fn end(&self) -> RunEnd {
        self.end
    }

    /// Wall time of the whole run.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// How many RCU stall reports a kernel printed on the console (`rcu_preempt detected
    /// stalls` / `self-detected stall`): with QEMU's TCG running nested SVM guests, a test host
    /// CPU sometimes stops taking timer interrupts, which freezes whatever ran there.
    pub fn rcu_stalls(&self) -> usize {
        self.lines
            .iter()
            .filter(|line| {
                line.text.contains("rcu_preempt detected stalls")
                    || line.text.contains("rcu_preempt self-detected stall")
            })
            .count()
    }

    /// The whole console as one section.
    pub fn all(&self) -> Section<'_> {
        Section {
            output: self,
            label: None,
            lines: &self.lines,
        }
    }

    /// The lines of rvmm run `name` (between `HOST begin <name>` and `HOST end <name>`, or to
    /// the end of the console if the run never ended). Panics, with the console tail, if the run
    /// never began.
    #[track_caller]
    pub fn section(&self, name: &str) -> Section<'_> {
        match self.try_section(name) {
            Some(section) => section,
            None => self.all().fail(&format!(
                "the scenario never began rvmm run '{name}' (no 'HOST begin {name}')"
            )),
        }
    }

    /// Like [`TestHostOutput::section`], `None` if the run never began.
    pub fn try_section(&self, name: &str) -> Option<Section<'_>> {
        let is = |line: &Line, what: &str| {
            Marker::parse(&line.text).is_some_and(|marker| {
                marker.source == Source::Host && marker.key == what && marker.value == name
            })
        };
        let begin = self.lines.iter().position(|line| is(line, "begin"))?;
        let rest = self.lines.get(begin + 1..).unwrap_or_default();
        let len = rest
            .iter()
            .position(|line| is(line, "end"))
            .unwrap_or(rest.len());
        Some(Section {
            output: self,
            label: Some(name.to_string()),
            lines: rest.get(..len).unwrap_or_default(),
        })
    }

    /// The first `HOST key` marker, see [`Section::host`].
    pub fn host(&self, key: &str) -> Option<Marker<'_>> {
        self.all().host(key)
    }

    /// The first `HOST key` marker or a loud failure, see [`Section::expect_host`].
    #[track_caller]
    pub fn expect_host(&self, key: &str) -> Marker<'_> {
        self.all().expect_host(key)
    }

    /// When the first `HOST key` marker arrived, counted from the start of the run.
    pub fn host_marker_time(&self, key: &str) -> Option<Duration> {
        self.lines.iter().find_map(|line| {
            Marker::parse(&line.text)
                .filter(|marker| marker.source == Source::Host && marker.key == key)
                .map(|_| line.at)
        })
    }

    /// A one-line account of the run: end, timings, log path.
    pub fn summary(&self) -> String {
        let end = match self.end {
            RunEnd::Exited(0) => "QEMU exited normally".to_string(),
            RunEnd::Exited(code) => format!("QEMU exited with status {code}"),
            RunEnd::TimedOut => "TIMED OUT".to_string(),
            RunEnd::Froze => "FROZE (its heartbeat stopped; ended early)".to_string(),
            RunEnd::Killed => "killed by a signal".to_string(),
        };
        let at = |key: &str| {
            self.host_marker_time(key)
                .map_or("never".to_string(), |at| {
                    format!("{:.1}s", at.as_secs_f64())
                })
        };
        format!(
            "test host run '{}': {end} after {:.1}s (init at {}, ready at {}, poweroff at {}); \
             console log: {}",
            self.name,
            self.elapsed.as_secs_f64(),
            at("up"),
            at("ready"),
            at("poweroff"),
            self.log_path.display()
        )
    }

    /// The failure context: summary, hints about common causes, and the last console lines.
    pub fn context(&self) -> String {
        self.all().context()
    }
}

/// A part of the console: all of it, or one rvmm run.
#[derive(Clone, Debug)]
pub struct Section<'a> {
    output: &'a TestHostOutput,
    label: Option<String>,
    lines: &'a [Line],
}

impl<'a> Section<'a> {
    /// The lines of the section.
    pub fn lines(&self) -> &'a [Line] {
        self.lines
    }

    /// The markers of the section, in console order.
    pub fn markers(&self) -> impl Iterator<Item = Marker<'a>> {
        self.lines
            .iter()
            .filter_map(|line| Marker::parse(&line.text))
    }

    /// The first marker of `source` with `key`.
    pub fn find(&self, source: Source, key: &str) -> Option<Marker<'a>> {
        self.markers()
            .find(|marker| marker.source == source && marker.key == key)
    }

    /// Every marker of `source` with `key`.
    pub fn find_all(&self, source: Source, key: &str) -> Vec<Marker<'a>> {
        self.markers()
            .filter(|marker| marker.source == source && marker.key == key)
            .collect()
    }

    /// The first `HOST key` marker.
    pub fn host(&self, key: &str) -> Option<Marker<'a>> {
        self.find(Source::Host, key)
    }

    /// Every `HOST key` marker.
    pub fn host_all(&self, key: &str) -> Vec<Marker<'a>> {
        self.find_all(Source::Host, key)
    }

    /// The first `GUEST key` marker.
    pub fn guest(&self, key: &str) -> Option<Marker<'a>> {
        self.find(Source::Guest, key)
    }

    /// Every `GUEST key` marker.
    pub fn guest_all(&self, key: &str) -> Vec<Marker<'a>> {
        self.find_all(Source::Guest, key)
    }

    /// The first `HOST key` marker; fails loudly if there is none.
    #[track_caller]
    pub fn expect_host(&self, key: &str) -> Marker<'a> {
        self.expect(Source::Host, key)
    }

    /// The first `GUEST key` marker; fails loudly if there is none.
    #[track_caller]
    pub fn expect_guest(&self, key: &str) -> Marker<'a> {
        self.expect(Source::Guest, key)
    }

    /// The number in the first `HOST key` marker; fails loudly if missing or not a number.
    #[track_caller]
    pub fn expect_host_u64(&self, key: &str) -> u64 {
        self.expect_u64(Source::Host, key)
    }

    /// The number in the first `GUEST key` marker; fails loudly if missing or not a number.
    #[track_caller]
    pub fn expect_guest_u64(&self, key: &str) -> u64 {
        self.expect_u64(Source::Guest, key)
    }

    /// The exit status of the section's rvmm run (`HOST rvmm_exit <code>`).
    #[track_caller]
    pub fn rvmm_exit(&self) -> i64 {
        let marker = self.expect_host("rvmm_exit");
        match marker.word(0).and_then(|word| word.parse().ok()) {
            Some(code) => code,
            None => self.fail(&format!(
                "'HOST rvmm_exit {}' is not a number",
                marker.value
            )),
        }
    }

    /// The text rvmm wrote to stderr in an `rvmm_capture` run (`HOST stderr` lines).
    pub fn stderr(&self) -> String {
        self.captured("stderr")
    }

    /// The text rvmm wrote to stdout in an `rvmm_capture` run (`HOST stdout` lines).
    pub fn stdout(&self) -> String {
        self.captured("stdout")
    }

    /// Whether any line of the section contains `text`.
    pub fn contains(&self, text: &str) -> bool {
        self.lines.iter().any(|line| line.text.contains(text))
    }

    /// Panics with `message` and the failure context (log path, summary, console lines).
    #[track_caller]
    pub fn fail(&self, message: &str) -> ! {
        panic!("{message}\n{}", self.context())
    }

    /// Asserts `condition`; otherwise fails loudly with `message`.
    #[track_caller]
    pub fn check(&self, condition: bool, message: &str) {
        if !condition {
            self.fail(message);
        }
    }

    /// Summary, hints and the last console lines of the section.
    pub fn context(&self) -> String {
        let mut text = format!("--- {}\n", self.output.summary());
        for hint in self.output.hints() {
            let _ = writeln!(text, "--- hint: {hint}");
        }
        let shown = self.lines.len().min(CONTEXT_LINES);
        let start = self.lines.len() - shown;
        let scope = match &self.label {
            Some(label) => format!("of rvmm run '{label}'"),
            None => "of the console".to_string(),
        };
        let _ = writeln!(text, "--- last {shown} lines {scope}:");
        for line in self.lines.get(start..).unwrap_or_default() {
            let _ = writeln!(text, "{}", line.text);
        }
        text.push_str("--- end");
        text
    }

    #[track_caller]
    fn expect(&self, source: Source, key: &str) -> Marker<'a> {
        match self.find(source, key) {
            Some(marker) => marker,
            None => self.fail(&format!("no '{} {key}' marker", source.prefix())),
        }
    }

    #[track_caller]
    fn expect_u64(&self, source: Source, key: &str) -> u64 {
        let marker = self.expect(source, key);
        match marker.as_u64() {
            Some(value) => value,
            None => self.fail(&format!(
                "'{} {key} {}' does not start with a number",
                source.prefix(),
                marker.value
            )),
        }
    }

    fn captured(&self, key: &str) -> String {
        let mut text = String::new();
        for line in self.lines {
            let Some(rest) = line.text.trim_start().strip_prefix("HOST ") else {
                continue;
            };
            let Some(content) = rest.strip_prefix(key) else {
                continue;
            };
            if content.is_empty() || content.starts_with(' ') {
                text.push_str(content.strip_prefix(' ').unwrap_or(content));
                text.push('\n');
            }
        }
        text
    }
}

impl TestHostOutput {
    /// Likely causes worth printing first, read from the whole console.
    fn hints(&self) -> Vec<String> {
        let mut hints = Vec::new();
        let all = self.all();
        if self.end == RunEnd::TimedOut {
            hints.push("the run hit its timeout: the last lines show where it hung".to_string());
        }
        if self.end == RunEnd::Froze {
            hints.push(
                "the test host froze (its heartbeat stopped: no timer interrupt or no \
                 scheduling; docs/performance.md); the state printed says where it stood"
                    .to_string(),
            );
        }
        if all.contains("Kernel panic") {
            hints.push(
                "a kernel panicked (test host or guest): see 'Kernel panic' in the log".to_string(),
            );
        }
        if all.host("up").is_none() {
            hints.push("the test host never reached its init: QEMU or kernel problem".to_string());
        }
        if let Some(marker) = all.host("kvm").filter(|marker| marker.value != "ok") {
            hints.push(format!("/dev/kvm in the test host: {}", marker.value));
        }
        if all
            .host("rvmm")
            .is_some_and(|marker| marker.value == "missing")
        {
            hints.push("the test host initramfs has no rvmm binary".to_string());
        }
        for marker in all.host_all("modprobe_failed") {
            hints.push(format!(
                "module load failed in the test host: {}",
                marker.value
            ));
        }
        if all.contains("panicked at") {
            hints.push("rvmm panicked: see 'panicked at' in the log".to_string());
        }
        hints
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(text: &str) -> TestHostOutput {
        let lines = text
            .lines()
            .enumerate()
            .map(|(index, line)| Line {
                at: Duration::from_millis(u64::try_from(index).unwrap_or(0) * 100),
                text: clean_line(line),
            })
            .collect();
        TestHostOutput::new(
            "unit",
            Path::new("/tmp/unit.log"),
            lines,
            RunEnd::Exited(0),
            Duration::from_secs(3),
        )
    }

    #[test]
    fn rcu_stall_reports_are_counted() {
        let out = output(
            "HOST up 1\n[  25.8] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\n\
             [  26.0] rcu: INFO: rcu_preempt self-detected stall on CPU\nHOST end x",
        );

        assert_eq!(out.rcu_stalls(), 2);
    }

    #[test]
    fn console_without_stall_reports_has_none() {
        assert_eq!(
            output("HOST up 1\nrcu: Hierarchical RCU implementation.").rcu_stalls(),
            0
        );
    }

    #[test]
    fn csi_sequences_and_carriage_returns_are_removed() {
        let text = clean_line("\u{1b}c\u{1b}[?7l\u{1b}[2JHOST up 3.02\r");

        assert_eq!(text, "HOST up 3.02");
    }

    #[test]
    fn tabs_are_kept_and_other_controls_dropped() {
        assert_eq!(clean_line("a\tb\u{7}c\u{0}"), "a\tbc");
    }

    #[test]
    fn host_marker_splits_into_key_and_value() {
        let marker = Marker::parse("HOST vfio_bind 0000:01:00.0 ok group=4");

        assert_eq!(
            marker,
            Some(Marker {
                source: Source::Host,
                key: "vfio_bind",
                value: "0000:01:00.0 ok group=4",
            })
        );
    }

    #[test]
    fn marker_without_value_has_empty_value() {
        let marker = Marker::parse("GUEST done");

        assert_eq!(marker.map(|marker| marker.value), Some(""));
    }

    #[test]
    fn line_not_starting_with_a_source_is_not_a_marker() {
        assert_eq!(Marker::parse("[ 1.0] kvm: HOST up 3"), None);
        assert_eq!(Marker::parse("HOSTILE takeover"), None);
        assert_eq!(Marker::parse("GUEST "), None);
    }

    #[test]
    fn field_finds_name_value_words() {
        let marker = Marker::parse("GUEST port 0000:00:01.0 pciehp=bound secondary_bus=1");

        assert_eq!(
            marker.and_then(|marker| marker.field("pciehp")),
            Some("bound")
        );
        assert_eq!(marker.and_then(|marker| marker.field("pcie")), None);
    }

    #[test]
    fn as_u64_reads_the_first_word() {
        let marker = Marker::parse("GUEST memtotal_kb 475148 extra");

        assert_eq!(marker.and_then(|marker| marker.as_u64()), Some(475_148));
    }

    #[test]
    fn section_holds_only_the_lines_of_its_run() {
        let output = output(
            "GUEST cpus 1\nHOST begin a\nGUEST cpus 2\nHOST rvmm_exit 0\nHOST end a\n\
             HOST begin b\nGUEST cpus 4\nHOST end b",
        );

        assert_eq!(output.section("a").expect_guest_u64("cpus"), 2);
        assert_eq!(output.section("b").expect_guest_u64("cpus"), 4);
        assert_eq!(output.section("a").rvmm_exit(), 0);
    }

    #[test]
    fn unterminated_section_runs_to_the_end() {
        let output = output("HOST begin a\nGUEST up 1.0\nGUEST cpus 2");

        assert_eq!(output.section("a").lines().len(), 2);
    }

    #[test]
    fn missing_section_is_none() {
        let output = output("HOST begin a\nHOST end a");

        assert!(output.try_section("b").is_none());
    }

    #[test]
    #[should_panic(expected = "no 'GUEST cpus' marker")]
    fn missing_marker_fails_loudly() {
        let output = output("HOST begin a\nGUEST up 1.0\nHOST end a");

        output.section("a").expect_guest("cpus");
    }

    #[test]
    fn failure_context_names_the_log_and_shows_the_lines() {
        let output = output("HOST up 1.0\nsomething odd");

        let context = output.context();

        assert!(context.contains("/tmp/unit.log"));
        assert!(context.contains("something odd"));
    }

    #[test]
    fn failure_context_hints_at_a_missing_kvm() {
        let output = output("HOST up 1.0\nHOST kvm missing");

        assert!(output
            .context()
            .contains("/dev/kvm in the test host: missing"));
    }

    #[test]
    fn stderr_collects_captured_lines_in_order() {
        let output = output(
            "HOST begin x\nHOST stderr error: bad size\nHOST stdout hi\nHOST stderr  indented\n\
             HOST stderrx no\nHOST end x",
        );

        assert_eq!(output.section("x").stderr(), "error: bad size\n indented\n");
        assert_eq!(output.section("x").stdout(), "hi\n");
    }

    #[test]
    fn host_marker_time_is_the_arrival_of_the_first_match() {
        let output = output("noise\nHOST up 3.0\nHOST up 4.0");

        assert_eq!(
            output.host_marker_time("up"),
            Some(Duration::from_millis(100))
        );
    }
}
