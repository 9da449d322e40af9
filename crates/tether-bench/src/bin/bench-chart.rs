//! `bench-chart`: reads the JSON lines of `scripts/bench-compare.sh`
//! (`tether bench` output, one object per run) and draws Tether and Nchan side by side
//! as grouped bars into a PNG: deliveries/s, p99 latency, server CPU per delivery and
//! server memory per idle connection. Rounds of the same scenario are averaged.
//!
//! Text is drawn with `ab_glyph` from a TrueType file read at run time (`--font`), so
//! there is no font-kit/fontconfig dependency.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Parser;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

#[derive(Parser, Debug)]
#[command(
    name = "bench-chart",
    about = "Tether vs Nchan bar chart from bench JSON lines"
)]
struct Cli {
    /// JSON lines from `tether bench` (one object per run).
    #[arg(long, default_value = "target/bench-compare/results.jsonl")]
    input: PathBuf,
    /// The PNG to write.
    #[arg(long, default_value = "docs/bench-compare.png")]
    output: PathBuf,
    /// A TrueType font file.
    #[arg(
        long,
        default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    )]
    font: PathBuf,
    /// A line under the title (date, machine).
    #[arg(long, default_value = "")]
    subtitle: String,
    /// Also write Markdown tables (one per scenario, Tether and Nchan side by side,
    /// means over rounds) to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

const TETHER: RGBColor = RGBColor(31, 119, 180);
const NCHAN: RGBColor = RGBColor(255, 127, 14);

/// One panel: a metric per scenario label, per target (sum and count, for the mean).
#[derive(Default)]
struct Panel {
    labels: Vec<String>,
    values: BTreeMap<(String, String), (f64, u32)>,
}

impl Panel {
    fn add(&mut self, label: &str, target: &str, v: Option<f64>) {
        let Some(v) = v.filter(|v| v.is_finite()) else {
            return;
        };
        if !self.labels.iter().any(|l| l == label) {
            self.labels.push(label.to_owned());
        }
        let e = self
            .values
            .entry((label.to_owned(), target.to_owned()))
            .or_default();
        e.0 += v;
        e.1 += 1;
    }

    fn mean(&self, label: &str, target: &str) -> Option<f64> {
        self.values
            .get(&(label.to_owned(), target.to_owned()))
            .map(|(s, n)| s / f64::from(*n))
    }
}

fn scenario_label(v: &serde_json::Value) -> Option<String> {
    let k = |key: &str| v[key].as_u64().unwrap_or(0) as f64 / 1000.0;
    if v["scenario"].as_str() == Some("chat") {
        let rate = match v["rate"].as_f64() {
            Some(r) if r > 0.0 => format!("{r} publishes/s"),
            _ => "back-to-back".to_owned(),
        };
        return Some(format!(
            "chat {}, {}k conns over {}k channels, {} publishers {rate}",
            v["transport"].as_str().unwrap_or("ws").to_uppercase(),
            k("connections"),
            k("channels"),
            v["publishers"].as_u64().unwrap_or(0),
        ));
    }
    if v["scenario"].as_str() == Some("churn") {
        return Some(format!(
            "churn WS, {} workers",
            v["workers"].as_u64().unwrap_or(0)
        ));
    }
    let transport = v["transport"].as_str().unwrap_or("ws").to_uppercase();
    match v["scenario"].as_str()? {
        "idle" => Some(format!(
            "idle {transport}, {}k conns",
            v["requested"].as_u64().unwrap_or(0) as f64 / 1000.0
        )),
        "fanout" => {
            let mode = match v["mode"].as_str() {
                Some("paced") => format!("paced {} msg/s", v["rate"].as_f64().unwrap_or(0.0)),
                _ => match v["publishers"].as_u64() {
                    Some(n) if n > 1 => format!("back-to-back, {n} publishers"),
                    _ => "back-to-back".to_owned(),
                },
            };
            // A burst with `--poll-stats-ms` is its own scenario.
            let polled = match v["stats_poll"]["every_ms"].as_u64() {
                Some(ms) => format!(", GET /api/stats every {ms} ms"),
                None if v["stats_poll"].is_object() => ", GET /api/stats (none)".to_owned(),
                None => String::new(),
            };
            Some(format!(
                "{transport} {mode}, {}k subs{polled}",
                k("subscribers")
            ))
        }
        _ => None,
    }
}

fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;
type Drawn = Result<(), Box<dyn std::error::Error>>;

/// Draws `text` at `at` on `root`, centred horizontally, `v` the vertical anchor.
fn centred(
    root: &Area<'_>,
    text: String,
    at: (i32, i32),
    size: u32,
    color: &RGBColor,
    v: VPos,
) -> Drawn {
    root.draw(&Text::new(
        text,
        at,
        ("sans-serif", size)
            .into_font()
            .color(color)
            .pos(Pos::new(HPos::Center, v)),
    ))?;
    Ok(())
}

/// One panel: a pair of bars per scenario label (Tether, Nchan), the label under them
/// and, where both have a figure, their ratio.
fn draw_panel(root: &Area<'_>, area: &Area<'_>, title: &str, p: &Panel) -> Drawn {
    let n = p.labels.len().max(1);
    let means = || p.values.values().map(|(s, c)| s / f64::from(*c));
    let top = means().fold(0.0f64, f64::max);
    let top = if top > 0.0 { top * 1.2 } else { 1.0 };
    // A negative figure (memory freed during an idle run on a reused server) still shows.
    let bottom = means().fold(0.0f64, f64::min) * 1.2;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .margin_bottom(40)
        .x_label_area_size(10)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n as f64, bottom..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .disable_x_axis()
        .light_line_style(WHITE)
        .y_label_formatter(&|v| short(*v))
        .label_style(("sans-serif", 14))
        .draw()?;
    if p.labels.is_empty() {
        let at = chart.backend_coord(&(0.5, top / 2.0));
        return centred(root, "no data".into(), at, 18, &BLACK, VPos::Center);
    }
    for (i, label) in p.labels.iter().enumerate() {
        draw_bars(root, &mut chart, p, i as f64, label)?;
        draw_label(root, &chart, p, i as f64, label, bottom)?;
    }
    Ok(())
}

/// The Tether and Nchan bars of `label` at `x0`, each with its figure above it.
fn draw_bars(root: &Area<'_>, chart: &mut Chart<'_, '_>, p: &Panel, x0: f64, label: &str) -> Drawn {
    for (target, color, from, to) in [("tether", TETHER, 0.12, 0.48), ("nchan", NCHAN, 0.52, 0.88)]
    {
        let Some(v) = p.mean(label, target) else {
            continue;
        };
        chart.draw_series(std::iter::once(Rectangle::new(
            [(x0 + from, 0.0), (x0 + to, v)],
            color.filled(),
        )))?;
        let (tx, ty) = chart.backend_coord(&(x0 + (from + to) / 2.0, v.max(0.0)));
        centred(root, short(v), (tx, ty - 4), 14, &BLACK, VPos::Bottom)?;
    }
    Ok(())
}

/// `label` under its bars at `x0` and, where Nchan's figure is not zero, the ratio.
fn draw_label(
    root: &Area<'_>,
    chart: &Chart<'_, '_>,
    p: &Panel,
    x0: f64,
    label: &str,
    bottom: f64,
) -> Drawn {
    let (lx, ly) = chart.backend_coord(&(x0 + 0.5, bottom));
    centred(root, label.to_owned(), (lx, ly + 8), 14, &BLACK, VPos::Top)?;
    if let (Some(t), Some(n)) = (p.mean(label, "tether"), p.mean(label, "nchan")) {
        if n > 0.0 {
            let ratio = format!("Tether/Nchan {:.2}", t / n);
            centred(
                root,
                ratio,
                (lx, ly + 26),
                13,
                &RGBColor(90, 90, 90),
                VPos::Top,
            )?;
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-chart: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// How a JSON line starts (the others are passed over).
const OBJECT: char = '{';

/// The runs in bench JSON lines: `(scenario label, target, the object)` of every line
/// that parses, has a target and a scenario with a label; other lines are passed over.
fn results(text: &str) -> impl Iterator<Item = (String, String, serde_json::Value)> + '_ {
    text.lines()
        .filter(|l| l.trim_start().starts_with(OBJECT))
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|v| {
            let label = scenario_label(&v)?;
            let target = v["target"].as_str()?.to_owned();
            Some((label, target, v))
        })
}

/// The chart's four panels.
#[derive(Default)]
struct Panels {
    rate: Panel,
    p99: Panel,
    cpu: Panel,
    mem: Panel,
}

impl Panels {
    /// The panels of every run in `text`, and how many runs there were.
    fn of(text: &str) -> (Panels, usize) {
        let mut ps = Panels::default();
        let mut runs = 0;
        for (label, target, v) in results(text) {
            runs += 1;
            ps.add(&label, &target, &v);
        }
        (ps, runs)
    }

    fn add(&mut self, label: &str, target: &str, v: &serde_json::Value) {
        match v["scenario"].as_str() {
            Some("idle") => self.mem.add(
                label,
                target,
                v["pss_bytes_per_connection"].as_f64().map(|b| b / 1024.0),
            ),
            // The same burst polled for its stats is in the tables only.
            Some("fanout") if !v["stats_poll"].is_null() => {}
            Some("chat") => {
                self.rate
                    .add(label, target, v["deliveries_per_sec"].as_f64());
                self.p99.add(label, target, v["latency_ms_p99"].as_f64());
                self.cpu
                    .add(label, target, v["server_cpu_us_per_delivery"].as_f64());
            }
            Some("fanout") => {
                if v["mode"].as_str() != Some("paced") {
                    self.rate
                        .add(label, target, v["deliveries_per_sec"].as_f64());
                }
                self.p99.add(label, target, v["latency_ms_p99"].as_f64());
                self.cpu
                    .add(label, target, v["server_cpu_us_per_delivery"].as_f64());
            }
            _ => {}
        }
    }
}

/// Registers the TrueType file at `path` as the charts' "sans-serif".
fn register_font(path: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let font = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // plotters keeps registered fonts for the life of the process.
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| format!("{}: not a usable font", path.display()))?;
    Ok(())
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    register_font(&cli.font)?;
    let text =
        std::fs::read_to_string(&cli.input).map_err(|e| format!("{}: {e}", cli.input.display()))?;
    let (panels, runs) = Panels::of(&text);
    if runs == 0 {
        return Err(format!(
            "{}: no idle, fanout, chat or churn results",
            cli.input.display()
        )
        .into());
    }
    if let Some(md) = &cli.markdown {
        std::fs::write(md, markdown(&text)).map_err(|e| format!("{}: {e}", md.display()))?;
    }
    if let Some(dir) = cli.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    draw_chart(&cli, &panels)?;
    println!("{}", cli.output.display());
    Ok(())
}

/// The PNG: a header (title, subtitle, legend) over the four panels, 2 × 2.
fn draw_chart(cli: &Cli, panels: &Panels) -> Drawn {
    let root = BitMapBackend::new(&cli.output, (1600, 1100)).into_drawing_area();
    root.fill(&WHITE)?;
    let (head, body) = root.split_vertically(70);
    draw_header(&head, &cli.subtitle)?;
    let areas = body.split_evenly((2, 2));
    let specs = [
        ("deliveries/s (higher is better)", &panels.rate),
        ("p99 latency, ms (lower is better)", &panels.p99),
        ("server CPU per delivery, µs (lower is better)", &panels.cpu),
        (
            "server PSS per idle connection, KiB (lower is better)",
            &panels.mem,
        ),
    ];
    for (area, (title, panel)) in areas.iter().zip(specs) {
        draw_panel(&root, area, title, panel)?;
    }
    root.present()?;
    Ok(())
}

/// The title, `subtitle` and the legend.
fn draw_header(head: &Area<'_>, subtitle: &str) -> Drawn {
    head.draw(&Text::new(
        "Tether vs Nchan (tether bench, loopback)",
        (24, 12),
        ("sans-serif", 28).into_font().color(&BLACK),
    ))?;
    head.draw(&Text::new(
        subtitle.to_owned(),
        (24, 46),
        ("sans-serif", 15).into_font().color(&RGBColor(90, 90, 90)),
    ))?;
    for (i, (name, color)) in [("Tether", TETHER), ("Nchan", NCHAN)].iter().enumerate() {
        let x = 1300 + i as i32 * 140;
        head.draw(&Rectangle::new([(x, 18), (x + 22, 40)], color.filled()))?;
        head.draw(&Text::new(
            *name,
            (x + 30, 20),
            ("sans-serif", 18).into_font().color(&BLACK),
        ))?;
    }
    Ok(())
}

/// How a table cell is printed.
#[derive(Clone, Copy)]
enum Fmt {
    /// Thousands separators, no decimals.
    Int,
    /// Three significant figures.
    Num,
    /// Bytes, shown as KiB with the bytes in parentheses.
    Bytes,
}

type Metric = (&'static str, fn(&serde_json::Value) -> Option<f64>, Fmt);

fn f(v: &serde_json::Value, k: &str) -> Option<f64> {
    v[k].as_f64()
}

fn count_map(v: &serde_json::Value) -> Option<f64> {
    v.as_object().map(|m| {
        m.values()
            .filter_map(serde_json::Value::as_u64)
            .sum::<u64>() as f64
    })
}

const IDLE: &[Metric] = &[
    ("connections opened", |v| f(v, "opened"), Fmt::Int),
    ("connect errors", |v| count_map(&v["errors"]), Fmt::Int),
    ("connect time, s", |v| f(v, "connect_secs"), Fmt::Num),
    (
        "server PSS per connection",
        |v| f(v, "pss_bytes_per_connection"),
        Fmt::Bytes,
    ),
    (
        "server RSS per connection",
        |v| f(v, "rss_bytes_per_connection"),
        Fmt::Bytes,
    ),
];

const FANOUT_COUNTS: &[Metric] = &[
    ("subscribers ready", |v| f(v, "opened"), Fmt::Int),
    ("connect errors", |v| count_map(&v["errors"]), Fmt::Int),
    ("publish errors", |v| f(v, "publish_errors"), Fmt::Int),
    (
        "deliveries expected",
        |v| f(v, "expected_deliveries"),
        Fmt::Int,
    ),
    ("deliveries", |v| f(v, "deliveries"), Fmt::Int),
    (
        "receivers short of messages",
        |v| f(v, "incomplete_receivers"),
        Fmt::Int,
    ),
];

/// `fanout`'s `--poll-stats-ms` rows (Tether only; rows without figures are left out).
const STATS_POLL: &[Metric] = &[
    (
        "GET /api/stats polls",
        |v| v["stats_poll"]["polls"].as_f64(),
        Fmt::Int,
    ),
    (
        "GET /api/stats errors",
        |v| v["stats_poll"]["errors"].as_f64(),
        Fmt::Int,
    ),
    (
        "GET /api/stats p50, ms",
        |v| v["stats_poll"]["latency_ms_p50"].as_f64(),
        Fmt::Num,
    ),
    (
        "GET /api/stats p99, ms",
        |v| v["stats_poll"]["latency_ms_p99"].as_f64(),
        Fmt::Num,
    ),
    (
        "GET /api/stats max, ms",
        |v| v["stats_poll"]["latency_ms_max"].as_f64(),
        Fmt::Num,
    ),
];

const CHAT_COUNTS: &[Metric] = &[
    ("connections ready", |v| f(v, "opened"), Fmt::Int),
    (
        "connect errors",
        |v| v["errors"]["connect"].as_f64(),
        Fmt::Int,
    ),
    (
        "publishes accepted",
        |v| f(v, "publishes_accepted"),
        Fmt::Int,
    ),
    (
        "publish errors",
        |v| v["errors"]["publish"].as_f64(),
        Fmt::Int,
    ),
    (
        "publishes/s accepted",
        |v| f(v, "publishes_per_sec"),
        Fmt::Int,
    ),
    (
        "deliveries expected",
        |v| f(v, "expected_deliveries"),
        Fmt::Int,
    ),
    ("deliveries", |v| f(v, "deliveries"), Fmt::Int),
];

/// The delivery rows `fanout` and `chat` share: the rate, the latency, the server's
/// CPU and memory.
const DELIVERY: &[Metric] = &[
    ("deliveries/s", |v| f(v, "deliveries_per_sec"), Fmt::Int),
    ("latency p50, ms", |v| f(v, "latency_ms_p50"), Fmt::Num),
    ("latency p99, ms", |v| f(v, "latency_ms_p99"), Fmt::Num),
    ("latency p99.9, ms", |v| f(v, "latency_ms_p999"), Fmt::Num),
    ("latency max, ms", |v| f(v, "latency_ms_max"), Fmt::Num),
    ("server CPU, s", |v| f(v, "server_cpu_secs"), Fmt::Num),
    (
        "server CPU per delivery, µs",
        |v| f(v, "server_cpu_us_per_delivery"),
        Fmt::Num,
    ),
    (
        "server PSS after, MiB",
        |v| f(v, "server_pss_kib").map(|k| k / 1024.0),
        Fmt::Num,
    ),
];

/// A scenario's table: its groups of rows, in order.
type Table = &'static [&'static [Metric]];

const FANOUT: Table = &[FANOUT_COUNTS, DELIVERY, STATS_POLL];

const CHAT: Table = &[CHAT_COUNTS, DELIVERY];

const CHURN: &[Metric] = &[
    ("cycles/s", |v| f(v, "cycles_per_sec"), Fmt::Int),
    ("cycles", |v| f(v, "cycles"), Fmt::Int),
    ("failed cycles", |v| f(v, "failed"), Fmt::Int),
];

fn thousands(v: f64) -> String {
    let s = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0.0 && s != "0" {
        format!("-{out}")
    } else {
        out
    }
}

fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        thousands(v)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn cell(vals: &[f64], fmt: Fmt) -> String {
    if vals.is_empty() {
        return "—".into();
    }
    let one = |v: f64| match fmt {
        Fmt::Int => thousands(v),
        Fmt::Num => num(v),
        Fmt::Bytes => format!("{} KiB ({} B)", num(v / 1024.0), thousands(v)),
    };
    let mean = vals.iter().sum::<f64>() / vals.len() as f64;
    if vals.len() == 1 {
        return one(mean);
    }
    let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let range = match fmt {
        Fmt::Bytes => format!("{}–{} B", thousands(lo), thousands(hi)),
        _ => format!("{}–{}", one(lo), one(hi)),
    };
    format!("{} ({range})", one(mean))
}

/// Markdown tables: one per scenario label, a row per metric, Tether and Nchan
/// side by side (mean over rounds, range in parentheses) and their ratio.
fn markdown(text: &str) -> String {
    let mut labels: Vec<(String, Table)> = Vec::new();
    let mut runs: BTreeMap<(String, String), Vec<serde_json::Value>> = BTreeMap::new();
    for (label, target, v) in results(text) {
        let metrics: Table = match v["scenario"].as_str() {
            Some("idle") => &[IDLE],
            Some("fanout") => FANOUT,
            Some("chat") => CHAT,
            Some("churn") => &[CHURN],
            _ => continue,
        };
        if !labels.iter().any(|(l, _)| *l == label) {
            labels.push((label.clone(), metrics));
        }
        runs.entry((label, target)).or_default().push(v);
    }
    let mut out = String::new();
    for (label, metrics) in labels {
        let get = |t: &str| runs.get(&(label.clone(), t.to_owned()));
        let (tether, nchan) = (get("tether"), get("nchan"));
        let rounds = |r: Option<&Vec<serde_json::Value>>| r.map_or(0, Vec::len);
        out.push_str(&format!(
            "### {label}\n\n| | Tether ({} run{}) | Nchan ({} run{}) | Tether/Nchan |\n| --- | --- | --- | --- |\n",
            rounds(tether),
            if rounds(tether) == 1 { "" } else { "s" },
            rounds(nchan),
            if rounds(nchan) == 1 { "" } else { "s" },
        ));
        for (name, get_v, fmt) in metrics.iter().copied().flatten() {
            if *name == "deliveries/s" && label.contains("paced") {
                continue; // paced: the publish rate sets it
            }
            let vals = |r: Option<&Vec<serde_json::Value>>| -> Vec<f64> {
                r.map(|r| {
                    r.iter()
                        .filter_map(get_v)
                        .filter(|x| x.is_finite())
                        .collect()
                })
                .unwrap_or_default()
            };
            let (t, n) = (vals(tether), vals(nchan));
            if t.is_empty() && n.is_empty() {
                continue;
            }
            let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
            let ratio = match (mean(&t), mean(&n)) {
                (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
                _ => "—".into(),
            };
            out.push_str(&format!(
                "| {name} | {} | {} | {ratio} |\n",
                cell(&t, *fmt),
                cell(&n, *fmt)
            ));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_and_stats_poll_tables() {
        let lines = [
            r#"{"scenario":"chat","target":"tether","transport":"ws","connections":10000,"channels":2000,"publishers":8,"rate":0.0,"opened":10000,"errors":{"connect":0,"publish":0},"publishes_accepted":40000,"publishes_per_sec":4000.0,"expected_deliveries":200000,"deliveries":200000,"deliveries_per_sec":20000.0,"latency_ms_p99":4.0}"#,
            r#"{"scenario":"chat","target":"tether","transport":"ws","connections":10000,"channels":2000,"publishers":8,"rate":0.0,"opened":10000,"errors":{"connect":0,"publish":0},"publishes_accepted":60000,"publishes_per_sec":6000.0,"expected_deliveries":300000,"deliveries":300000,"deliveries_per_sec":30000.0,"latency_ms_p99":6.0}"#,
            r#"{"scenario":"chat","target":"nchan","transport":"ws","connections":10000,"channels":2000,"publishers":8,"rate":0.0,"opened":10000,"errors":{"connect":0,"publish":2},"publishes_accepted":25000,"publishes_per_sec":2500.0,"expected_deliveries":125000,"deliveries":125000,"deliveries_per_sec":12500.0,"latency_ms_p99":10.0}"#,
            r#"{"scenario":"fanout","target":"tether","transport":"ws","mode":"back_to_back","publishers":1,"subscribers":10000,"opened":10000,"deliveries":2000000,"deliveries_per_sec":1500000.0,"stats_poll":{"every_ms":10,"polls":150,"errors":0,"latency_ms_p50":1.5,"latency_ms_p99":12.0,"latency_ms_max":20.0}}"#,
            r#"{"scenario":"fanout","target":"tether","transport":"ws","mode":"back_to_back","publishers":1,"subscribers":10000,"opened":10000,"deliveries":2000000,"deliveries_per_sec":1700000.0}"#,
        ]
        .join("\n");
        let md = markdown(&lines);
        let chat = "### chat WS, 10k conns over 2k channels, 8 publishers back-to-back\n\n| | Tether (2 runs) | Nchan (1 run) | Tether/Nchan |";
        assert!(md.contains(chat), "{md}");
        // Mean with the range; the ratio of the means.
        assert!(
            md.contains("| publishes/s accepted | 5,000 (4,000–6,000) | 2,500 | 2.00 |"),
            "{md}"
        );
        assert!(
            md.contains("| latency p99, ms | 5.00 (4.00–6.00) | 10.0 | 0.50 |"),
            "{md}"
        );
        assert!(
            md.contains("| publish errors | 0 (0–0) | 2 | 0.00 |"),
            "{md}"
        );
        // The polled burst is a table of its own, with the stats rows; the plain
        // burst has none of them.
        let polled = md
            .split("### ")
            .find(|t| t.starts_with("WS back-to-back, 10k subs, GET /api/stats every 10 ms"))
            .expect("the polled burst's table");
        assert!(
            polled.contains("| GET /api/stats p99, ms | 12.0 | — | — |"),
            "{polled}"
        );
        let plain = md
            .split("### ")
            .find(|t| t.starts_with("WS back-to-back, 10k subs\n"))
            .expect("the plain burst's table");
        assert!(!plain.contains("/api/stats"), "{plain}");
    }
}
