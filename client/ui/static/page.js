// keystay's employee page: the page works without this script. It only keeps
// the figures fresh: it reloads the overview every 30 s while nobody is using
// a form on it, so a pause that ran out or a finished round shows up.
"use strict";
(function () {
  if (!document.getElementById("state")) { return; }  // confirmation or message page
  var busy = false;
  document.addEventListener("focusin", function () { busy = true; });
  document.addEventListener("focusout", function () { busy = false; });
  window.setInterval(function () {
    if (!busy && !document.querySelector("details[open]")) { window.location.replace("/"); }
  }, 30000);
})();
