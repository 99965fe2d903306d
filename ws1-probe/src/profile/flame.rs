//! Interactive SVG flame graphs, drawn by inferno from the profile's folded stacks so the SVG and
//! `--format folded` always show the same stacks and values.

use inferno::flamegraph::{
    self,
    color::{BasicPalette, Palette},
};

use super::{Profile, ProfileKind, fold};

/// Why a flame graph could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum FlameError {
    /// inferno failed to write the SVG.
    #[error("failed to draw the flame graph")]
    Render {
        #[source]
        source: std::io::Error,
    },
}

/// Draws a profile as an SVG flame graph titled `title`.
///
/// Widths are samples for on-CPU profiles and microseconds for off-CPU ones (the folded values).
/// Off-CPU graphs use inferno's blue "io" palette, the convention that tells blocked time from
/// CPU time at a glance; on-CPU graphs use the usual red-yellow one. Colors are chosen by a hash
/// of the function name, so a function keeps its color from one graph to the next.
pub fn svg(profile: &Profile, title: &str) -> Result<Vec<u8>, FlameError> {
    let folded = fold::folded(profile);
    if folded.is_empty() {
        // inferno refuses input without stacks; a graph of an idle window is still an answer.
        return Ok(empty_svg(title));
    }
    let mut options = flamegraph::Options::default();
    options.title = title.to_owned();
    options.hash = true;
    match profile.kind {
        ProfileKind::Cpu => {
            options.count_name = "samples".to_owned();
            options.colors = Palette::Basic(BasicPalette::Hot);
        }
        ProfileKind::OffCpu => {
            options.count_name = "us".to_owned();
            options.colors = Palette::Basic(BasicPalette::Io);
        }
    }
    let mut out = Vec::with_capacity(folded.len() * 4);
    flamegraph::from_lines(&mut options, folded.lines(), &mut out)
        .map_err(|source| FlameError::Render { source })?;
    Ok(out)
}

/// A small SVG with the title and "no samples", the size of inferno's own header.
fn empty_svg(title: &str) -> Vec<u8> {
    let mut out = String::from(
        "<?xml version=\"1.0\" standalone=\"no\"?>\n\
         <svg version=\"1.1\" width=\"1200\" height=\"80\" viewBox=\"0 0 1200 80\" \
         xmlns=\"http://www.w3.org/2000/svg\">\n\
         <rect x=\"0\" y=\"0\" width=\"100%\" height=\"100%\" fill=\"#eeeeee\"/>\n\
         <text x=\"50%\" y=\"24\" text-anchor=\"middle\" font-family=\"Verdana\" \
         font-size=\"17\">",
    );
    push_escaped(&mut out, title);
    out.push_str(
        "</text>\n\
         <text x=\"50%\" y=\"56\" text-anchor=\"middle\" font-family=\"Verdana\" \
         font-size=\"12\">no samples</text>\n\
         </svg>\n",
    );
    out.into_bytes()
}

/// Appends text with the characters XML gives meaning to escaped.
fn push_escaped(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{ProfFrame, StackSample};

    fn profile(kind: ProfileKind) -> Profile {
        let mut p = Profile::new(kind, 100, 0);
        p.stacks = vec![
            StackSample {
                service: "checkout".to_owned(),
                pid: 1,
                frames: vec![
                    ProfFrame {
                        kernel: true,
                        ..ProfFrame::named("schedule")
                    },
                    ProfFrame::named("compute_total"),
                    ProfFrame::named("main"),
                ],
                samples: 3,
                value_ns: 3_000_000,
                truncated: false,
            },
            StackSample {
                service: "checkout".to_owned(),
                pid: 1,
                frames: vec![ProfFrame::named("parse_order"), ProfFrame::named("main")],
                samples: 1,
                value_ns: 1_000_000,
                truncated: false,
            },
        ];
        p
    }

    fn text(bytes: &[u8]) -> &str {
        std::str::from_utf8(bytes).unwrap()
    }

    #[test]
    fn cpu_flame_graph_shows_frames_and_title() {
        let out = svg(&profile(ProfileKind::Cpu), "CPU of checkout").unwrap();
        let s = text(&out);
        assert!(s.starts_with("<?xml"), "{}", &s[..40]);
        assert!(s.trim_end().ends_with("</svg>"));
        for name in [
            "CPU of checkout",
            "checkout",
            "main",
            "compute_total",
            "parse_order",
            "schedule",
        ] {
            assert!(s.contains(name), "missing {name}");
        }
        // inferno reads the kernel annotation for coloring and drops it from the labels.
        assert!(!s.contains("_[k]"));
        // The tooltip of the root counts all four samples.
        assert!(s.contains("4 samples"), "no total in the tooltips");
    }

    #[test]
    fn off_cpu_flame_graph_counts_microseconds_in_blue() {
        let out = svg(&profile(ProfileKind::OffCpu), "off-CPU").unwrap();
        let s = text(&out);
        assert!(
            s.contains("4,000 us"),
            "no microsecond total in the tooltips"
        );
        assert!(!s.contains(" samples"));
        // inferno's blue background gradient for the io palette ends at #e0e0ff.
        assert!(s.to_ascii_lowercase().contains("#e0e0ff"));
        let cpu = svg(&profile(ProfileKind::Cpu), "cpu").unwrap();
        assert!(!text(&cpu).to_ascii_lowercase().contains("#e0e0ff"));
    }

    #[test]
    fn empty_profile_is_an_svg_saying_so() {
        let out = svg(
            &Profile::new(ProfileKind::Cpu, 100, 0),
            "idle <svc> & \"friends\"",
        )
        .unwrap();
        let s = text(&out);
        assert!(s.starts_with("<?xml"));
        assert!(s.contains("<svg"));
        assert!(s.contains("no samples"));
        assert!(s.contains("idle &lt;svc&gt; &amp; &quot;friends&quot;"));
        assert!(s.trim_end().ends_with("</svg>"));
    }
}
