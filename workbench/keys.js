// Keyboard shortcuts for ranking: digits pick, t ties, Backspace undoes, s skips, Enter submits,
// n takes the next group; for blind verification: ArrowLeft (left better), = (same), ArrowRight
// (right better). Keys typed into a text field are left alone; a shortcut whose button is hidden
// (another tab, or no candidate in that slot) does nothing.
document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;  // a held key presses once
  const typing = event.target.closest &&
    event.target.closest("textarea, select, [contenteditable=true], input:not([type=radio]):not([type=checkbox])");
  if (typing) return;
  const named = { t: "rank-tie", Backspace: "rank-undo", s: "rank-skip", Enter: "rank-submit", n: "rank-next",
                  ArrowLeft: "verify-left", "=": "verify-same", ArrowRight: "verify-right" };
  const id = /^[1-9]$/.test(event.key) ? `rank-pick-${Number(event.key) - 1}` : named[event.key];
  const button = id && document.getElementById(id);
  if (!button || button.offsetParent === null) return;
  event.preventDefault();
  button.click();
});
