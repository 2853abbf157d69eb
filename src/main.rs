use clap::Parser;
use obelisk::cli::{run, Cli};

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        // the whole anyhow chain on one line: scripts and users grep for the file name
        let msg = e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ");
        eprintln!("error: {}", msg.replace('\n', " "));
        std::process::exit(1);
    }
}
