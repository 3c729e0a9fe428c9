// Starts ReDoc on the /redoc page. The page's Content-Security-Policy allows scripts
// from this node only, so this lives in a file instead of an inline script.
"use strict";

window.addEventListener("load", function () {
  var root = document.getElementById("redoc");
  Redoc.init(
    root.dataset.openapiUrl,
    {
      // The document's own JSON is one click away at /openapi.json.
      hideDownloadButton: false,
      expandResponses: "200",
      pathInMiddlePanel: true,
    },
    root
  );
});
