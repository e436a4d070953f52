// Markdown (a model card) rendered as DOM built from text: headings, paragraphs, lists, fenced code,
// tables, and inline code/bold/italic/links. No HTML string is ever parsed, so whatever the card holds
// (it quotes user data: names, datasets, hyperparameters) stays text. Links keep only http(s) targets.

import { h } from "./dom.js";

// Emphasis with underscores only between word boundaries, so snake_case names stay as they are.
const INLINE = /(`[^`]+`|\*\*[^*]+\*\*|\*[^*\s][^*]*\*|(?<![\w])_[^_]+_(?![\w])|\[[^\]]+\]\([^)\s]+\))/g;

function inline(text) {
  const nodes = [];
  let last = 0;
  for (const match of text.matchAll(INLINE)) {
    if (match.index > last) nodes.push(text.slice(last, match.index));
    const token = match[0];
    if (token.startsWith("`")) nodes.push(h("code", { text: token.slice(1, -1) }));
    else if (token.startsWith("**")) nodes.push(h("strong", { text: token.slice(2, -2) }));
    else if (token.startsWith("[")) {
      const [, label, href] = token.match(/^\[([^\]]+)\]\(([^)\s]+)\)$/);
      nodes.push(/^https?:\/\//.test(href) ? h("a", { href, rel: "noopener noreferrer", text: label }) : label);
    } else nodes.push(h("em", { text: token.slice(1, -1) }));
    last = match.index + token.length;
  }
  if (last < text.length) nodes.push(text.slice(last));
  return nodes;
}

const cellsOf = (line) => line.trim().replace(/^\||\|$/g, "").split("|").map((c) => c.trim());

export function renderMarkdown(source) {
  const root = h("div", { class: "markdown" });
  const lines = source.replace(/^---\n[\s\S]*?\n---\n/, "").split("\n");  // YAML front matter: shown as metadata elsewhere
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (line.startsWith("```")) {
      const code = [];
      for (i += 1; i < lines.length && !lines[i].startsWith("```"); i += 1) code.push(lines[i]);
      root.append(h("pre", {}, h("code", { text: code.join("\n") })));
      i += 1;
    } else if (/^#{1,6} /.test(line)) {
      const level = Math.min(6, line.indexOf(" ") + 2);  // the card's h1 sits under the page's h2
      root.append(h(`h${level}`, {}, inline(line.replace(/^#+ /, ""))));
      i += 1;
    } else if (/^\s*[-*] /.test(line)) {
      const list = h("ul");
      for (; i < lines.length && /^\s*[-*] /.test(lines[i]); i += 1) list.append(h("li", {}, inline(lines[i].replace(/^\s*[-*] /, ""))));
      root.append(list);
    } else if (line.trim().startsWith("|") && /^\s*\|?[\s:-]+\|/.test(lines[i + 1] ?? "")) {
      const head = cellsOf(line);
      const rows = [];
      for (i += 2; i < lines.length && lines[i].trim().startsWith("|"); i += 1) rows.push(cellsOf(lines[i]));
      root.append(h("table", { tabindex: 0, "aria-label": head.join(", ") },
                    h("thead", {}, h("tr", {}, head.map((c) => h("th", {}, inline(c))))),
                    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, inline(c))))))));
    } else if (line.trim() === "") {
      i += 1;
    } else {
      const para = [];
      for (; i < lines.length && lines[i].trim() !== "" && !/^(#{1,6} |```|\s*[-*] |\s*\|)/.test(lines[i]); i += 1) para.push(lines[i]);
      if (!para.length) { para.push(line); i += 1; }
      root.append(h("p", {}, inline(para.join(" "))));
    }
  }
  return root;
}
