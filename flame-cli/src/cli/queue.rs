//! `flame queue`: how the head shares executors between owners, and within each owner
//! between its sessions, and why work waits.

use super::GlobalArgs;
use crate::render::outln;
use crate::render::{self, number, text, OutputArgs, OutputFormat};
use flame_protocol::model::{HeadStorage, OwnerQueue, QueueReport, SessionQueue};
use std::fmt::Write as _;

pub async fn run(global: &GlobalArgs, out: OutputArgs) -> anyhow::Result<()> {
    let report =
        super::with_client(global, |client| async move { Ok(client.queue().await?) }).await?;
    match out.output {
        OutputFormat::Json => render::print_json(&report),
        OutputFormat::Table => {
            outln!("{}", report_text(&report))?;
            Ok(())
        }
    }
}

/// Indent of a session table under its owner's row.
const SESSION_INDENT: &str = "  ";

/// The human form: the capacity, then per owner a one-row table and, indented beneath it,
/// its sessions.
pub fn report_text(report: &QueueReport) -> String {
    let mut out = format!("Capacity of the Ready nodes: {}.", report.capacity);
    if let Some(head) = &report.head {
        out.push('\n');
        out.push_str(&head_line(head));
    }
    if report.owners.is_empty() {
        out.push_str("\n\nNo unfinished sessions.");
        return out;
    }
    for owner in &report.owners {
        out.push_str("\n\n");
        out.push_str(&owner_table(owner));
        if owner.sessions.is_empty() {
            let _ = write!(out, "\n{SESSION_INDENT}No sessions.");
            continue;
        }
        for line in session_table(&owner.sessions).lines() {
            let _ = write!(out, "\n{SESSION_INDENT}{line}");
        }
    }
    out
}

/// The head's storage in one line, with a warning when space is low or writes stop.
fn head_line(head: &HeadStorage) -> String {
    let mut line = format!(
        "Head storage: {} free of {}",
        render::bytes(head.free_bytes),
        render::bytes(head.total_bytes)
    );
    if let Some(fault) = &head.fault {
        let _ = write!(line, "; WRITES STOPPED: {fault}");
    } else if head.free_bytes < head.low_bytes {
        let _ = write!(
            line,
            "; LOW (below {}): free space in the head's data directory",
            render::bytes(head.low_bytes)
        );
    }
    line.push('.');
    line
}

fn owner_table(owner: &OwnerQueue) -> String {
    let columns = [
        text("Owner"),
        number("Weight"),
        number("Deserved"),
        number("Allocated"),
        number("Executors"),
        number("Pending"),
    ];
    let row = vec![
        owner.owner.clone(),
        render::group(u64::from(owner.weight)),
        render::permille(owner.deserved_permille),
        render::permille(owner.allocated_permille),
        render::group(u64::from(owner.executors)),
        render::group(owner.pending_tasks),
    ];
    render::table(&columns, vec![row])
}

fn session_table(sessions: &[SessionQueue]) -> String {
    let columns = [
        number("Session"),
        text("App"),
        number("Priority"),
        number("Deserved"),
        number("Executors"),
        number("Pending"),
        number("Running"),
        text("Waiting"),
    ];
    let rows = sessions
        .iter()
        .map(|s| {
            vec![
                s.id.to_string(),
                render::application(&s.application),
                s.priority.to_string(),
                render::group(u64::from(s.deserved_executors)),
                render::group(u64::from(s.executors)),
                render::group(s.pending_tasks),
                render::group(s.running_tasks),
                s.waiting
                    .as_deref()
                    .and_then(|w| w.lines().next())
                    .unwrap_or("-")
                    .to_string(),
            ]
        })
        .collect();
    render::table(&columns, rows)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use flame_protocol::model::Resources;
    use flame_protocol::SessionId;

    fn session(id: u64, priority: i32, waiting: Option<&str>) -> SessionQueue {
        SessionQueue {
            id: SessionId(id),
            application: "svc".into(),
            priority,
            deserved_executors: 3,
            executors: 2,
            pending_tasks: 1_500,
            running_tasks: 2,
            waiting: waiting.map(str::to_string),
        }
    }

    fn report() -> QueueReport {
        QueueReport {
            capacity: Resources {
                cpu_millis: 4000,
                memory_bytes: Some(8 << 30),
                gpus: 0,
            },
            owners: vec![
                OwnerQueue {
                    owner: "alice".into(),
                    weight: 1,
                    deserved_permille: 250,
                    allocated_permille: 500,
                    executors: 2,
                    pending_tasks: 1_500,
                    sessions: vec![session(7, -1, Some("reclaiming 1 executor\nmore"))],
                },
                OwnerQueue {
                    owner: "bob".into(),
                    weight: 3,
                    deserved_permille: 750,
                    allocated_permille: 500,
                    executors: 2,
                    pending_tasks: 3_000,
                    sessions: vec![session(8, 10, None), session(9, 0, None)],
                },
                OwnerQueue {
                    owner: "carol".into(),
                    weight: 2,
                    deserved_permille: 0,
                    allocated_permille: 0,
                    executors: 0,
                    pending_tasks: 0,
                    sessions: Vec::new(),
                },
            ],
            head: None,
        }
    }

    /// The line that starts with `start` (after indentation), with its cells split.
    fn cells<'a>(text: &'a str, start: &str) -> Vec<&'a str> {
        text.lines()
            .find(|l| l.trim_start().starts_with(start))
            .unwrap_or_else(|| panic!("no line starting with `{start}` in:\n{text}"))
            .split_whitespace()
            .collect()
    }

    #[test]
    fn owners_with_their_sessions_beneath() {
        let text = report_text(&report());
        assert!(
            text.starts_with("Capacity of the Ready nodes: cpus 4, memory 8 GiB."),
            "{text}"
        );
        assert_eq!(
            cells(&text, "alice"),
            ["alice", "1", "25.0%", "50.0%", "2", "1,500"],
            "{text}"
        );
        assert_eq!(
            cells(&text, "bob"),
            ["bob", "3", "75.0%", "50.0%", "2", "3,000"],
            "{text}"
        );
        // Only the first line of a waiting reason, so each session stays on one line.
        assert_eq!(
            cells(&text, "7 "),
            [
                "7",
                "svc",
                "-1",
                "3",
                "2",
                "1,500",
                "2",
                "reclaiming",
                "1",
                "executor"
            ],
            "{text}"
        );
        assert!(!text.contains("more"), "{text}");
        assert_eq!(cells(&text, "8 ")[2], "10", "{text}");
        assert_eq!(cells(&text, "9 ").last(), Some(&"-"), "{text}");
        // Each session sits under its owner, indented, before the next owner.
        let position = |needle: &str| {
            text.lines()
                .position(|l| l.trim_start().starts_with(needle))
                .unwrap_or_else(|| panic!("no `{needle}` in:\n{text}"))
        };
        assert!(position("alice") < position("7 "), "{text}");
        assert!(position("7 ") < position("bob"), "{text}");
        assert!(position("bob") < position("8 "), "{text}");
        assert!(position("9 ") < position("carol"), "{text}");
        let session_line = &text.lines().nth(position("8 ")).unwrap();
        assert!(session_line.starts_with(SESSION_INDENT), "{text}");
        // An owner without sessions says so.
        assert_eq!(
            text.lines().nth(position("carol") + 1).unwrap().trim(),
            "No sessions."
        );
    }

    #[test]
    fn the_head_line_warns_of_low_space_and_stopped_writes() {
        let mut head = HeadStorage {
            free_bytes: 5 << 30,
            total_bytes: 10 << 30,
            low_bytes: 1 << 30,
            fault: None,
        };
        let with = |head: &HeadStorage| {
            report_text(&QueueReport {
                head: Some(head.clone()),
                ..QueueReport::default()
            })
        };
        let text = with(&head);
        let line = text.lines().nth(1).unwrap();
        assert!(line.starts_with("Head storage: "), "{text}");
        assert!(!line.contains("LOW") && !line.contains("STOPPED"), "{text}");
        head.free_bytes = 1 << 20;
        assert!(with(&head).contains("LOW (below "), "{}", with(&head));
        head.fault = Some("the head's disk is full".into());
        let text = with(&head);
        assert!(
            text.contains("WRITES STOPPED: the head's disk is full"),
            "{text}"
        );
    }

    #[test]
    fn an_empty_queue_says_so() {
        let text = report_text(&QueueReport::default());
        assert!(text.ends_with("No unfinished sessions."), "{text}");
    }
}
