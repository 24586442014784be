//! Rendering a run's findings as JSON, Markdown or HTML.

use std::fmt::Write;

use portcullis_store::{AuditRunRecord, AuditSummary, FindingRecord, NotTested};
use serde_json::json;

use crate::finding::Severity;

/// A report format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Machine-readable.
    Json,
    /// For tickets and chat.
    Markdown,
    /// A self-contained page.
    Html,
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "json" => Ok(Self::Json),
            "markdown" | "md" => Ok(Self::Markdown),
            "html" => Ok(Self::Html),
            _ => Err(format!("format {s:?}: use json, markdown or html")),
        }
    }
}

fn sorted(findings: &[FindingRecord]) -> Vec<&FindingRecord> {
    let mut v: Vec<&FindingRecord> = findings.iter().collect();
    v.sort_by(|a, b| {
        (a.status == "resolved", std::cmp::Reverse(Severity::parse(&a.severity)), &a.device, &a.key).cmp(&(
            b.status == "resolved",
            std::cmp::Reverse(Severity::parse(&b.severity)),
            &b.device,
            &b.key,
        ))
    });
    v
}

fn when(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// Renders `run` with its findings.
pub fn render(run: &AuditRunRecord, findings: &[FindingRecord], format: Format) -> String {
    match format {
        Format::Json => {
            serde_json::to_string_pretty(&json!({ "run": run, "findings": findings })).unwrap_or_default()
        }
        Format::Markdown => markdown(run, findings),
        Format::Html => html(run, findings),
    }
}

fn counts(findings: &[FindingRecord]) -> (usize, usize, usize) {
    let n = |s: &str| findings.iter().filter(|f| f.status == s).count();
    (n("new"), n("open"), n("resolved"))
}

fn markdown(run: &AuditRunRecord, findings: &[FindingRecord]) -> String {
    let mut s = String::new();
    let (new, open, resolved) = counts(findings);
    let _ = writeln!(s, "# Portcullis audit run {}\n", run.id);
    let _ = writeln!(
        s,
        "Started {}, status **{}**. {} new, {} still open, {} resolved since the previous run.\n",
        when(run.started_at),
        run.status,
        new,
        open,
        resolved
    );
    if let AuditSummary::Finished(sum) = &run.summary {
        let _ = writeln!(
            s,
            "Devices: {} ({} scanned). Ports: {}. Probes: {} in {} s. Open ports: {}.\n",
            sum.devices,
            sum.devices_scanned,
            if sum.ports.is_empty() { "-" } else { &sum.ports },
            sum.scan_probes,
            sum.seconds,
            sum.open_ports,
        );
        if !sum.notes.is_empty() {
            for n in &sum.notes {
                let _ = writeln!(s, "- note: {n}");
            }
            s.push('\n');
        }
        if !sum.not_tested.is_empty() {
            let _ = writeln!(
                s,
                "**Not tested** (the check applied but could not be made; not a finding, not a pass):\n"
            );
            for n in &sum.not_tested {
                let _ = writeln!(
                    s,
                    "- {} {}: {} not tested: {}",
                    cell(&n.device),
                    cell(&n.target),
                    cell(&n.check),
                    cell(&n.reason)
                );
            }
            s.push('\n');
        }
    }
    let _ = writeln!(s, "| Status | Severity | Device | Target | Finding |");
    let _ = writeln!(s, "|---|---|---|---|---|");
    let cell = |t: &str| t.replace('|', "\\|").replace('\n', " ");
    for f in sorted(findings) {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            f.status,
            f.severity,
            cell(&f.device),
            cell(&f.target),
            cell(&f.title)
        );
    }
    for f in sorted(findings).into_iter().filter(|f| f.status != "resolved") {
        let _ = writeln!(s, "\n## {} — {} ({})\n", cell(&f.device), cell(&f.title), f.severity);
        let _ = writeln!(s, "- **Target:** {}", cell(&f.target));
        let _ = writeln!(s, "- **Evidence:** {}", cell(&f.evidence));
        let _ = writeln!(s, "- **Why it matters:** {}", cell(&f.why));
        let _ = writeln!(s, "- **Fix:** {}", cell(&f.remediation));
        let _ = writeln!(s, "- **Baselines:** {}", f.baselines.join("; "));
    }
    s
}

/// `(device, target, check, reason)` of each check the run could not make.
/// Checks that could not be made, from a finished run's summary.
fn not_tested(summary: &AuditSummary) -> &[NotTested] {
    match summary {
        AuditSummary::Finished(t) => &t.not_tested,
        _ => &[],
    }
}

/// One line of a Markdown list or table cell: no `|`, no line breaks.
fn cell(t: &str) -> String {
    t.replace(['|', '\n'], " ")
}

fn esc(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn html(run: &AuditRunRecord, findings: &[FindingRecord]) -> String {
    let (new, open, resolved) = counts(findings);
    let mut s = String::new();
    let _ = write!(
        s,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Portcullis audit run {id}</title>\
         <style>body{{font:14px system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top}}.critical{{background:#f8d0d0}}\
         .high{{background:#fbe3c8}}.medium{{background:#fdf6c8}}.resolved{{color:#777;text-decoration:line-through}}</style>\
         </head><body><h1>Portcullis audit run {id}</h1><p>Started {start}, status <b>{status}</b>: \
         {new} new, {open} still open, {resolved} resolved.</p><table><thead><tr><th>Status</th><th>Severity</th>\
         <th>Device</th><th>Target</th><th>Finding</th><th>Evidence</th><th>Fix</th><th>Baselines</th></tr></thead><tbody>",
        id = run.id,
        start = esc(&when(run.started_at)),
        status = esc(&run.status),
    );
    for f in sorted(findings) {
        let class = if f.status == "resolved" { "resolved".to_owned() } else { esc(&f.severity) };
        let _ = write!(
            s,
            "<tr class=\"{class}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}<br><small>{}</small></td>\
             <td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&f.status),
            esc(&f.severity),
            esc(&f.device),
            esc(&f.target),
            esc(&f.title),
            esc(&f.why),
            esc(&f.evidence),
            esc(&f.remediation),
            esc(&f.baselines.join("; ")),
        );
    }
    s.push_str("</tbody></table>");
    let untested = not_tested(&run.summary);
    if !untested.is_empty() {
        s.push_str("<h2>Not tested</h2><p>The check applied but could not be made: not a finding, not a pass.</p><ul>");
        for n in untested {
            let _ = write!(
                s,
                "<li>{} {}: {} not tested: {}</li>",
                esc(&n.device),
                esc(&n.target),
                esc(&n.check),
                esc(&n.reason)
            );
        }
        s.push_str("</ul>");
    }
    s.push_str("</body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_escapes_what_devices_said() {
        let run = AuditRunRecord {
            id: 1,
            started_at: time::OffsetDateTime::UNIX_EPOCH,
            finished_at: None,
            status: "finished".into(),
            request: portcullis_store::AuditScope::default(),
            summary: AuditSummary::Pending {},
        };
        let f = FindingRecord {
            device: "cam".into(),
            key: "k".into(),
            check: "exposure".into(),
            severity: "high".into(),
            title: "t".into(),
            target: "x".into(),
            evidence: "it said \"<script>alert(1)</script>\"".into(),
            why: "w".into(),
            remediation: "r".into(),
            baselines: vec![],
            status: "new".into(),
        };
        let h = render(&run, std::slice::from_ref(&f), Format::Html);
        assert!(!h.contains("<script>") && h.contains("&lt;script&gt;"));
        let m = render(&run, &[f], Format::Markdown);
        assert!(m.contains("| new | high | cam |"));
    }
}
