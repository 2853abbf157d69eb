//! Progress bars on stderr for the steps that take seconds to minutes. They are drawn only when
//! stderr is a terminal and `--quiet` is off; the library crates report through callbacks and
//! never see a bar.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use registration::engine::RegistrationConfig;

use crate::pipeline::RegEvent;

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
    pub fn registration(&self, config: &RegistrationConfig) -> RegistrationProgress {
        RegistrationProgress { progress: self.clone(), config: config.clone(), stage: None, step: None, log: None }
    }
}

/// Follows the engine's `(stage, iteration, loss)` callback.
pub struct RegistrationProgress {
    progress: Progress,
    config: RegistrationConfig,
    stage: Option<(String, ProgressBar)>,
    step: Option<ProgressBar>,
    log: Option<usize>,
}

impl RegistrationProgress {
    /// Without bars, prints a line every `every` iterations to stderr instead (for logs).
    pub fn log_every(mut self, every: usize) -> Self {
        self.log = Some(every.max(1));
        self
    }

    /// The most iterations stage `name` can run (affine, deformable-K), for the bar's length.
    fn stage_len(&self, name: &str) -> u64 {
        let n = match name.strip_prefix("deformable-").and_then(|k| k.parse::<usize>().ok()) {
            Some(k) => self.config.levels.get(k.wrapping_sub(1)).map_or(0, |l| l.iterations),
            None if name == "affine" => self.config.affine_iterations,
            None => 0,
        };
        n as u64
    }

    /// Follows the registration pipeline: a spinner per step, a bar per optimisation stage.
    pub fn event(&mut self, e: RegEvent) {
        match e {
            RegEvent::Step(name) => {
                self.finish();
                self.step = Some(self.progress.spinner(name));
            }
            RegEvent::Iteration { stage, iteration, loss } => self.update(stage, iteration, loss),
        }
    }

    pub fn update(&mut self, stage: &str, iteration: usize, loss: f64) {
        if let Some(s) = self.step.take() {
            s.finish_and_clear();
        }
        if !self.progress.visible() {
            if let Some(every) = self.log {
                if iteration % every == 0 {
                    eprintln!("{stage:<14} iteration {iteration:>4}  loss {loss:.5}");
                }
            }
            return;
        }
        if self.stage.as_ref().is_none_or(|(s, _)| s != stage) {
            self.finish();
            let bar = self.progress.bar(self.stage_len(stage), stage, "it");
            self.stage = Some((stage.to_string(), bar));
        }
        if let Some((_, bar)) = &self.stage {
            bar.set_position(iteration as u64 + 1);
            bar.set_message(format!("loss {loss:.5}"));
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

impl Drop for RegistrationProgress {
    fn drop(&mut self) {
        self.finish();
    }
}
