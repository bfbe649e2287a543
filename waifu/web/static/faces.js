// The faces page without reloads: every form posts through fetch (same CSRF token, same routes as without
// script), cards are redrawn from the answer, and the keyboard drives the one-at-a-time flow.
"use strict";

(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const grid = document.getElementById("grid");
  const flash = document.getElementById("flash");
  const dialog = document.getElementById("source-view");
  const cards = () => Array.from(grid.querySelectorAll("article.face"));

  function say(text, bad) {
    flash.textContent = text;
    flash.hidden = false;
    flash.classList.toggle("bad", !!bad);
  }

  async function post(url, fields) {
    const body = new URLSearchParams(fields);
    const response = await fetch(url, {
      method: "POST", body, credentials: "same-origin",
      headers: { "X-CSRF-Token": csrf, "Accept": "application/json" },
    });
    let answer;
    try { answer = await response.json(); } catch (e) { answer = { message: await response.text() }; }
    if (!response.ok) { say(answer.message || `refused (${response.status})`, true); return null; }
    say(answer.message);
    (answer.faces || []).forEach(redraw);
    return answer;
  }

  function text(tag, value, cls) {
    const el = document.createElement(tag);
    el.textContent = value;
    if (cls) el.className = cls;
    return el;
  }

  // one card from the server's view of the face
  function redraw(face) {
    const card = document.getElementById(`face-${face.id}`);
    if (!card) return;
    card.className = card.className.replace(/\b(state|source)-\S+/g, "").trim()
      + ` state-${face.state} source-${face.label_source || "none"} touched`;
    const line = card.querySelector('[data-role="label"]');
    line.replaceChildren();
    if (face.state === "rejected") {
      line.append(text("span", "rejected", "badge rejected"));
    } else if (face.label) {
      line.append(text("b", face.label), " ", text("span", face.label_source, `badge ${face.label_source}`));
    } else {
      line.append(text("span", face.label_source || "no label", `badge ${face.label_source || "none"}`));
    }
    const box = card.querySelector("input.select");
    if (box) box.checked = false;
    countSelected();
  }

  function selectedIds() {
    return cards().filter((c) => c.querySelector("input.select").checked).map((c) => c.dataset.id);
  }

  function countSelected() {
    document.getElementById("selected-count").textContent = `${selectedIds().length} selected`;
  }

  // forms: the card's own, the selection's (ids from the ticked boxes), undo
  document.addEventListener("submit", async (event) => {
    const form = event.target;
    if (!form.classList.contains("js-action")) return;
    event.preventDefault();
    const fields = new FormData(form);
    if (event.submitter && event.submitter.name) fields.set(event.submitter.name, event.submitter.value);
    if (form.id === "bulk") {
      fields.delete("id");
      fields.set("ids", selectedIds().join(","));
    }
    const card = form.closest("article.face");
    const answer = await post(form.getAttribute("action"), fields);  // not form.action: a field is named so
    if (answer && card) focusNext(card);
  });

  grid.addEventListener("change", (event) => { if (event.target.matches("input.select")) countSelected(); });

  function act(card, action, tag) {
    const fields = { action, ids: card.dataset.id };
    if (tag) fields.tag = tag;
    return post("/faces/action", fields).then((answer) => { if (answer) focusNext(card); });
  }

  async function undo() {
    const answer = await post("/faces/undo", {});
    const first = answer && answer.faces && answer.faces[0] && document.getElementById(`face-${answer.faces[0].id}`);
    if (first) first.focus();
  }

  function focusNext(card) {
    const all = cards();
    const next = all[all.indexOf(card) + 1];
    (next || card).focus();
  }

  // the card straight above or below: the nearest in x among the next row's cards
  function vertical(card, down) {
    const top = card.offsetTop, left = card.offsetLeft;
    const row = cards().filter((c) => (down ? c.offsetTop > top : c.offsetTop < top));
    if (!row.length) return null;
    const rowTop = down ? Math.min(...row.map((c) => c.offsetTop)) : Math.max(...row.map((c) => c.offsetTop));
    const same = row.filter((c) => c.offsetTop === rowTop);
    return same.reduce((a, b) => (Math.abs(b.offsetLeft - left) < Math.abs(a.offsetLeft - left) ? b : a));
  }

  function showSource(card) {
    dialog.querySelector("img").src = `/faces/${card.dataset.id}/source.png`;
    dialog.showModal();
  }

  grid.addEventListener("click", (event) => {
    const link = event.target.closest("a.source-link");
    if (!link) return;
    event.preventDefault();
    showSource(link.closest("article.face"));
  });

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.target.closest("input, select, textarea, button, dialog")) return;
    const card = event.target.closest ? event.target.closest("article.face") : null;
    const all = cards();
    if (event.key === "u") { event.preventDefault(); undo(); return; }
    if (!card) {
      if (event.key.startsWith("Arrow") && all.length) { event.preventDefault(); all[0].focus(); }
      return;
    }
    const index = all.indexOf(card);
    let target = null;
    switch (event.key) {
      case "ArrowRight": target = all[index + 1]; break;
      case "ArrowLeft": target = all[index - 1]; break;
      case "ArrowDown": target = vertical(card, true); break;
      case "ArrowUp": target = vertical(card, false); break;
      case "Enter":
        event.preventDefault();
        if (card.dataset.suggestion) act(card, "accept");
        else say(`face ${card.dataset.id} has no suggestion: pick a character with 1-9`, true);
        return;
      case "x": event.preventDefault(); act(card, "reject"); return;
      case "o": event.preventDefault(); showSource(card); return;
      case " ": {
        event.preventDefault();
        const box = card.querySelector("input.select");
        box.checked = !box.checked;
        countSelected();
        return;
      }
      default:
        if (/^[1-9]$/.test(event.key)) {
          event.preventDefault();
          const choices = JSON.parse(card.dataset.choices || "[]");
          const tag = choices[Number(event.key) - 1];
          if (tag) act(card, "label", tag);
          else say(`no character ${event.key} for face ${card.dataset.id}`, true);
        }
        return;
    }
    if (target) { event.preventDefault(); target.focus(); }
  });

  const first = cards()[0];
  if (first) first.focus({ preventScroll: true });
})();
