// Live updates of the events page: new events arrive over server-sent events and are added at the
// top of the table. The page works without this script; EventSource resumes after a reconnect by
// itself, sending the last id it saw (Last-Event-ID).
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  var table = document.getElementById("events");
  if (!table || !window.EventSource) return;
  var body = table.tBodies[0];
  var source = new EventSource(table.dataset.stream);
  source.addEventListener("event", function (message) {
    var e = JSON.parse(message.data);
    if (body.querySelector('tr[data-index="' + e.index + '"]')) return;
    var row = document.createElement("tr");
    row.dataset.index = String(e.index);
    if (e.rejected) row.className = "rejected";
    [["", e.index], ["", e.at], ["actor", e.actor], ["kind", e.kind], ["summary", e.summary]].forEach(function (c) {
      var cell = document.createElement("td");
      if (c[0]) cell.className = c[0];
      cell.textContent = String(c[1]);
      row.appendChild(cell);
    });
    body.insertBefore(row, body.firstChild);
  });
});
