// keystay's employee page: the page works without this script. It only keeps
// the figures fresh: it reloads the overview every data-refresh seconds (set
// by `keystay device ui --refresh`, 0 = never) while nobody is using a form
// on it, so a pause that ran out or a finished round shows up.
"use strict";
(function () {
  var main = document.querySelector("main[data-refresh]");
  var seconds = main ? Number(main.getAttribute("data-refresh")) : 0;
  if (!document.getElementById("state") || !(seconds > 0)) { return; }
  var busy = false;
  document.addEventListener("focusin", function () { busy = true; });
  document.addEventListener("focusout", function () { busy = false; });
  window.setInterval(function () {
    if (!busy && !document.querySelector("details[open]")) { window.location.replace("/"); }
  }, seconds * 1000);
})();
