#!/usr/bin/env bash
# Screenshot the cutover report's HTML in headless Chromium, to check how it renders.
#
#   scripts/report-screenshot.sh REPORT.html [OUT.png]
#       screenshot an existing report
#   scripts/report-screenshot.sh --config FILE [OUT.png] [-- REPORT-ARGS...]
#       run `dualwrite report --format html` first (e.g. `-- --since 48h`); its NO-GO exit
#       status does not stop the screenshot
#
# Environment: CHROMIUM (default: chromium, else chromium-browser, google-chrome),
# WINDOW (default 1200,1600), PDF=1 also writes OUT.pdf as Chromium prints it (A4, the
# report's print CSS). Needs Chromium (Debian: apt-get install chromium). Nothing is fetched
# from the network: the report is one self-contained file and these flags keep Chromium quiet.
set -euo pipefail

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

here="$(cd "$(dirname "$0")/.." && pwd)"
window="${WINDOW:-1200,1600}"
html="" config="" out="" report_args=()

while [ $# -gt 0 ]; do
    case "$1" in
        --config) config="${2:?--config needs a file}"; shift 2 ;;
        --) shift; report_args=("$@"); break ;;
        -h|--help) usage ;;
        *) if [ -z "$config" ] && [ -z "$html" ]; then html="$1"; else out="$1"; fi; shift ;;
    esac
done
[ -n "$html" ] || [ -n "$config" ] || usage

browser="${CHROMIUM:-}"
if [ -z "$browser" ]; then
    for candidate in chromium chromium-browser google-chrome; do
        if command -v "$candidate" >/dev/null 2>&1; then browser="$candidate"; break; fi
    done
fi
[ -n "$browser" ] || { echo "report-screenshot: Chromium not found (set CHROMIUM)" >&2; exit 2; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if [ -n "$config" ]; then
    html="$work/report.html"
    dualwrite="$here/.venv/bin/dualwrite"
    [ -x "$dualwrite" ] || dualwrite="dualwrite"
    status=0
    "$dualwrite" report --config "$config" --format html --out "$html" \
        ${report_args[@]+"${report_args[@]}"} || status=$?
    if [ "$status" -gt 1 ]; then exit "$status"; fi  # 1 is NO-GO: still worth a look
    out="${out:-report.png}"
fi
[ -f "$html" ] || { echo "report-screenshot: no such file: $html" >&2; exit 2; }
out="${out:-${html%.*}.png}"
url="file://$(cd "$(dirname "$html")" && pwd)/$(basename "$html")"

chrome() {
    "$browser" --headless --no-sandbox --disable-gpu --disable-background-networking \
        --disable-component-update --disable-sync --no-first-run \
        --user-data-dir="$work/profile" "$@" "$url" >"$work/chromium.log" 2>&1 \
        || { cat "$work/chromium.log" >&2; exit 1; }
}

chrome --screenshot="$out" --window-size="$window"
echo "report-screenshot: $out"
if [ "${PDF:-0}" = 1 ]; then
    chrome --print-to-pdf="${out%.*}.pdf" --no-pdf-header-footer
    echo "report-screenshot: ${out%.*}.pdf"
fi
