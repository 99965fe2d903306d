//! Human and JSON reports printed by the one-shot CLI commands, one file per probe.

pub mod allocs;
pub mod health;
pub mod leaks;
pub mod net;
pub mod slo;
pub mod syscalls;

/// ` (N not shown; use --top)` when a table shows fewer rows than it has, else nothing.
pub fn hidden_note(rows: usize, top: usize) -> String {
    match rows.saturating_sub(top) {
        0 => String::new(),
        hidden => format!(" ({hidden} not shown; use --top)"),
    }
}

/// Left-aligns the first column and right-aligns the rest.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut first = true;
        for (cell, w) in cells.zip(&widths) {
            if first {
                out.push_str(&format!("{cell:<w$}"));
                first = false;
            } else {
                out.push_str(&format!("  {cell:>w$}"));
            }
        }
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}
