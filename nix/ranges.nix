# The ranges in pyproject.toml must hold for the Python packages of the nixpkgs
# this flake is locked to (flake.lock). Given pyproject.toml (parsed) and a
# Python package set, returns true, or fails evaluation naming every package
# that the set holds at a version below our lower bound.
#
# Builtins only, no nixpkgs lib: .ci/check-flake evaluates this file offline
# against made-up package sets (docs/operations.md, "The lock and the lanes").
pyproject: ps:
let
  project = pyproject.project;
  extras = project.optional-dependencies or { };
  requirements =
    project.dependencies
    ++ builtins.concatLists (map (name: extras.${name}) (builtins.attrNames extras));
  # "name>=1.2" (an optional [extra] and further clauses ignored): name and bound.
  bound =
    r:
    let
      m = builtins.match "[[:space:]]*([A-Za-z0-9_.-]+)(\\[[^]]*])?[[:space:]]*>=[[:space:]]*([0-9][0-9a-zA-Z.]*).*" r;
    in
    if m == null then
      null
    else
      {
        name = builtins.replaceStrings [ "_" "." ] [ "-" "-" ] (builtins.elemAt m 0);
        min = builtins.elemAt m 2;
      };
  bounds = builtins.filter (b: b != null) (map bound requirements);
  below = builtins.filter (
    b: builtins.hasAttr b.name ps && builtins.compareVersions ps.${b.name}.version b.min < 0
  ) bounds;
  # One entry a package, though several extras may name it.
  described = builtins.attrNames (
    builtins.listToAttrs (
      map (b: {
        name = "${b.name} ${ps.${b.name}.version} (pyproject.toml wants >=${b.min})";
        value = null;
      }) below
    )
  );
in
if below == [ ] then
  true
else
  throw (
    "the locked nixpkgs holds Python packages below pyproject.toml's ranges: "
    + builtins.concatStringsSep ", " described
  )
