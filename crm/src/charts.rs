//! Charts drawn on the server as SVG, so that the stats page needs no script: one line per chart,
//! the values of the last samples, with the largest value and the last one written beside it.

/// A chart of `values` (oldest first), `width` × `height` pixels, titled `title`.
pub fn line(title: &str, values: &[u64], width: u32, height: u32) -> String {
    let max = values.iter().copied().max().unwrap_or(0).max(1);
    let (left, top, bottom) = (4.0, 18.0, 4.0);
    let plot_w = f64::from(width) - 2.0 * left;
    let plot_h = f64::from(height) - top - bottom;
    let step = if values.len() > 1 { plot_w / (values.len() - 1) as f64 } else { 0.0 };
    let points: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let x = left + step * i as f64;
            let y = top + plot_h - plot_h * (*v as f64) / (max as f64);
            format!("{x:.1},{y:.1}")
        })
        .collect();
    let last = values.last().copied().unwrap_or(0);
    format!(
        concat!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" width="{w}" height="{h}" viewBox="0 0 {w} {h}">"#,
            r#"<title>{title}</title>"#,
            r#"<text x="{left}" y="12" font-size="11">{title}: {last} (max {max})</text>"#,
            r##"<rect x="{left}" y="{top}" width="{pw:.1}" height="{ph:.1}" fill="none" stroke="#ccc"/>"##,
            r##"<polyline fill="none" stroke="#2f6b2f" stroke-width="1.5" points="{points}"/>"##,
            "</svg>"
        ),
        w = width,
        h = height,
        title = escape(title),
        left = left,
        top = top,
        pw = plot_w,
        ph = plot_h,
        last = last,
        max = values.iter().copied().max().unwrap_or(0),
        points = points.join(" "),
    )
}

/// `text` with the characters that mean something in XML escaped.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_has_a_point_per_value_and_escapes_its_title() {
        let svg = line("<b>blog</b> requests", &[0, 5, 10, 5], 300, 80);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("&lt;b&gt;blog&lt;/b&gt;") && !svg.contains("<b>"));
        let points = svg.split("points=\"").nth(1).unwrap().split('"').next().unwrap();
        assert_eq!(points.split(' ').count(), 4);
        // The largest value is at the top of the plot, zero at its bottom.
        assert!(points.contains(",18.0") && points.starts_with("4.0,76.0"), "{points}");
        assert!(svg.contains(": 5 (max 10)"));
    }

    #[test]
    fn no_values_draw_an_empty_chart() {
        let svg = line("idle", &[], 300, 80);
        assert!(svg.contains("points=\"\""));
    }
}
