//! Progress bars on stderr for the steps that take seconds to minutes. They are drawn only when
//! stderr is a terminal and `--quiet` is off; the library crates report through callbacks and
//! never see a bar.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use registration::method::{Event, LossRecord, MethodConfig, Observer, Stage};

/// Where bars go: a set of lines on stderr, or nowhere.
#[derive(Clone)]
pub struct Progress {
    multi: Option<MultiProgress>,
    quiet: bool,
}

impl Progress {
    /// Bars on stderr when it is a terminal and not `quiet`.
    pub fn new(quiet: bool) -> Self {
        let visible = !quiet && std::io::stderr().is_terminal();
        Self { multi: visible.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())), quiet }
    }

    /// No bars, whatever the terminal.
    pub fn hidden() -> Self {
        Self { multi: None, quiet: true }
    }

    /// Whether bars are drawn.
    pub fn visible(&self) -> bool {
        self.multi.is_some()
    }

    fn add(&self, bar: ProgressBar) -> ProgressBar {
        match &self.multi {
            Some(m) => m.add(bar),
            None => ProgressBar::hidden(),
        }
    }

    /// A bar counting `len` items of `what` (e.g. "subjects").
    pub fn bar(&self, len: u64, prefix: &str, what: &str) -> ProgressBar {
        let style = ProgressStyle::with_template(&format!(
            "{{prefix:>14}} [{{bar:30}}] {{pos}}/{{len}} {what} {{msg}} ({{elapsed}})"
        ))
        .expect("the template is valid")
        .progress_chars("=> ");
        let b = self.add(ProgressBar::new(len).with_style(style).with_prefix(prefix.to_string()));
        b.tick();
        b
    }

    /// A spinner for a step that reports nothing until it is done; clear it with
    /// [`ProgressBar::finish_and_clear`].
    pub fn spinner(&self, msg: &str) -> ProgressBar {
        let style = ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("the template is valid");
        let b = self.add(ProgressBar::new_spinner().with_style(style).with_message(msg.to_string()));
        b.enable_steady_tick(Duration::from_millis(120));
        b
    }

    /// Prints a line above the bars (or plainly when there are none), unless quiet.
    pub fn println(&self, line: &str) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(line);
            }
            None if !self.quiet => eprintln!("{line}"),
            None => {}
        }
    }

    /// Shows the iterations of a registration's stages, one bar per stage.
    pub fn registration(&self, config: &MethodConfig) -> RegistrationProgress {
        RegistrationProgress { progress: self.clone(), config: config.clone(), stage: None, step: None, log: None }
    }
}

/// Follows the method's events: a spinner per single step, a bar per optimised stage.
pub struct RegistrationProgress {
    progress: Progress,
    config: MethodConfig,
    stage: Option<(Stage, ProgressBar)>,
    step: Option<ProgressBar>,
    log: Option<usize>,
}

impl RegistrationProgress {
    /// Without bars, prints a line every `every` iterations to stderr instead (for logs).
    pub fn log_every(mut self, every: usize) -> Self {
        self.log = Some(every.max(1));
        self
    }

    fn update(&mut self, r: LossRecord) {
        if let Some(s) = self.step.take() {
            s.finish_and_clear();
        }
        if !self.progress.visible() {
            if let Some(every) = self.log {
                if r.iteration.is_multiple_of(every) {
                    eprintln!("{:<14} iteration {:>4}  loss {:.5}", r.stage.to_string(), r.iteration, r.loss);
                }
            }
            return;
        }
        if self.stage.as_ref().is_none_or(|(s, _)| *s != r.stage) {
            self.finish();
            let len = self.config.max_iterations(r.stage) as u64;
            let bar = self.progress.bar(len, &r.stage.to_string(), "it");
            self.stage = Some((r.stage, bar));
        }
        if let Some((_, bar)) = &self.stage {
            bar.set_position(r.iteration as u64 + 1);
            bar.set_message(format!("loss {:.5}", r.loss));
        }
    }

    /// Clears the current bar or spinner (stages may stop early, before their bar is full).
    pub fn finish(&mut self) {
        if let Some((_, bar)) = self.stage.take() {
            bar.finish_and_clear();
        }
        if let Some(s) = self.step.take() {
            s.finish_and_clear();
        }
    }
}

impl Observer for RegistrationProgress {
    fn event(&mut self, e: Event) {
        match e {
            // an optimised stage gets its bar with its first iteration
            Event::Started(stage) if stage.iterates() => {}
            Event::Started(stage) => {
                self.finish();
                self.step = Some(self.progress.spinner(&stage.to_string()));
            }
            Event::Iteration(r) => self.update(r),
        }
    }
}

impl Drop for RegistrationProgress {
    fn drop(&mut self) {
        self.finish();
    }
}
