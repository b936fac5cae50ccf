// Click-to-sort for <table class="sortable">: numeric columns (data-type="num") compare the cells'
// data-sort values as numbers; empty cells always go last. No dependencies, works from file://.
(function () {
  "use strict";
  function cellValue(row, idx) {
    var cell = row.cells[idx];
    if (!cell) return "";
    var v = cell.getAttribute("data-sort");
    return v === null ? cell.textContent.trim() : v;
  }
  function sortTable(table, idx, numeric, descending) {
    var body = table.tBodies[0];
    if (!body) return;
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = cellValue(a, idx), y = cellValue(b, idx);
      if (x === "" && y === "") return 0;
      if (x === "") return 1;
      if (y === "") return -1;
      var c = numeric ? parseFloat(x) - parseFloat(y) : x.localeCompare(y);
      return descending ? -c : c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  function init(table) {
    var heads = table.tHead ? table.tHead.rows[0].cells : [];
    Array.prototype.forEach.call(heads, function (th, idx) {
      th.addEventListener("click", function () {
        var numeric = th.getAttribute("data-type") === "num";
        // numbers start descending (best first for accuracies), text ascending
        var next = th.getAttribute("aria-sort") === (numeric ? "descending" : "ascending")
          ? (numeric ? "ascending" : "descending") : (numeric ? "descending" : "ascending");
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", next);
        sortTable(table, idx, numeric, next === "descending");
      });
    });
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), init);
})();
