{
  description = "jobd: a small, secure remote job runner over mutual TLS 1.3";

  # A release branch, locked to one revision and its narHash in flake.lock
  # (`nix flake update` moves it; docs/operations.md, "The lock and the lanes").
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;

      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f system nixpkgs.legacyPackages.${system});

      pyproject = builtins.fromTOML (builtins.readFile ./pyproject.toml);

      # Only what the build and its tests read: editing docs/ or contrib/
      # does not rebuild the package.
      src = lib.fileset.toSource {
        root = ./.;
        fileset = lib.fileset.unions [
          ./pyproject.toml
          ./README.md
          ./jobd
          ./jobctl
          ./protocol
          ./tests
          ./scripts
        ];
      };

      # The package as a function, so that the overlay and the NixOS module
      # build it with whichever nixpkgs they are given.
      jobdPackage =
        {
          python3Packages,
          openssl,
          installShellFiles,
        }:
        # Evaluation stops, naming the package, if this nixpkgs holds a Python
        # dependency (runtime, extras, test tools) below pyproject.toml's range.
        assert import ./nix/ranges.nix pyproject python3Packages;
        python3Packages.buildPythonApplication {
          pname = pyproject.project.name;
          inherit (pyproject.project) version;
          pyproject = true;
          inherit src;

          build-system = [ python3Packages.setuptools ];
          # cryptography is the jobd[ca] extra (jobd ca, jobctl cert); the Nix
          # package ships it, as Nomad and Teleport ship their CA commands.
          dependencies = with python3Packages; [
            trio
            msgpack
            cryptography
            shtab
          ];
          nativeBuildInputs = [
            installShellFiles
            python3Packages.argparse-manpage
          ];

          # The tests run scripts/dev-pki, whose "#!/usr/bin/env bash" does
          # not resolve in the build sandbox.
          postPatch = ''
            patchShebangs --build scripts
          '';

          # Completion scripts and man pages, generated from the parsers by the
          # code just installed (run with the build's Python: the wrappers come
          # later, in the fixup phase).
          postInstall = ''
            export PYTHONPATH="$out/${python3Packages.python.sitePackages}:$PYTHONPATH"
            py=${python3Packages.python.interpreter}
            installShellCompletion --cmd jobctl \
              --bash <($py -m jobctl completion bash) \
              --zsh <($py -m jobctl completion zsh) \
              --fish <($py -m jobctl completion fish)
            $py scripts/manpages.py man
            installManPage man/jobctl.1 man/jobctl-cert.1 man/jobd.8 man/jobd-ca.8
          '';

          nativeCheckInputs =
            (with python3Packages; [
              pytestCheckHook
              pytest-trio
              trustme
              hypothesis
              pytest-timeout
              # jobctl run -t and attach on a real terminal (tests/test_interactive_cli.py)
              pexpect
              # the "otel" extra, which the telemetry tests use
              opentelemetry-api
              opentelemetry-sdk
              opentelemetry-exporter-otlp-proto-http
              opentelemetry-proto
            ])
            ++ [ openssl ];
          # Tests start the installed jobd and jobctl as real processes, and
          # the sandbox's HOME does not exist.
          preCheck = ''
            export PATH="$out/bin:$PATH"
            export HOME="$(mktemp -d)"
          '';
          pythonImportsCheck = [
            "jobd"
            "jobctl"
            "protocol"
          ];

          meta = {
            description = pyproject.project.description;
            license = lib.licenses.mit;
            platforms = lib.platforms.linux;
            mainProgram = "jobd";
          };
        };

      # A throw-away PKI for the VM test, made by the same script developers
      # use (a wrapper over jobd ca and jobctl cert). Made once per build of
      # this derivation: the leaves are valid for 825 days from then.
      testPki =
        pkgs:
        pkgs.runCommand "jobd-test-pki"
          { nativeBuildInputs = [ (pkgs.callPackage jobdPackage { }) ]; }
          ''
            bash ${./scripts/dev-pki} "$out"
          '';
    in
    {
      overlays.default = final: _prev: { jobd = final.callPackage jobdPackage { }; };

      packages = forAllSystems (
        _system: pkgs: rec {
          jobd = pkgs.callPackage jobdPackage { };
          default = jobd;
        }
      );

      apps = forAllSystems (
        system: _pkgs:
        let
          pkg = self.packages.${system}.default;
        in
        rec {
          jobd = {
            type = "app";
            program = "${pkg}/bin/jobd";
            meta.description = "jobd, the job runner daemon";
          };
          jobctl = {
            type = "app";
            program = "${pkg}/bin/jobctl";
            meta.description = "jobctl, the jobd command-line client";
          };
          default = jobd;
        }
      );

      devShells = forAllSystems (
        _system: pkgs: {
          default = pkgs.mkShell {
            packages = [
              (pkgs.python3.withPackages (
                ps: with ps; [
                  trio
                  msgpack
                  # the "test" extra
                  pytest
                  pytest-trio
                  trustme
                  hypothesis
                  pytest-timeout
                  pexpect
                  argparse-manpage
                  shtab
                  opentelemetry-api
                  opentelemetry-sdk
                  opentelemetry-exporter-otlp-proto-http
                  opentelemetry-proto
                  # the "dev" extra (mypy inside the environment sees its packages)
                  mypy
                ]
              ))
              pkgs.ruff
              pkgs.openssl
              pkgs.socat
              pkgs.openssh
              pkgs.shellcheck
              pkgs.gnumake
            ];
            # Run everything from the checkout: `python -m jobd`, `python -m pytest`.
            shellHook = ''
              if [ -f pyproject.toml ]; then
                export PYTHONPATH="$PWD''${PYTHONPATH:+:$PYTHONPATH}"
              fi
            '';
          };
        }
      );

      nixosModules.default =
        {
          config,
          lib,
          pkgs,
          utils,
          ...
        }:
        let
          cfg = config.services.jobd;
          inherit (lib) mkOption types;
          inStore = p: builtins.isPath p || lib.hasPrefix "${builtins.storeDir}/" (toString p);
          # systemd's StateDirectory= names a directory below /var/lib.
          underVarLib = lib.hasPrefix "/var/lib/" cfg.stateDirectory;
        in
        {
          options.services.jobd = {
            enable = lib.mkEnableOption "jobd, the remote job runner (mutual TLS 1.3)";

            package = mkOption {
              type = types.package;
              default = pkgs.callPackage jobdPackage { };
              defaultText = lib.literalMD "jobd from this flake, built with the system's nixpkgs";
              description = "The jobd package; its jobctl is also installed system-wide.";
            };

            certificate = mkOption {
              type = types.path;
              example = "/etc/jobd/server.pem";
              description = "Server certificate (PEM), passed as `-c`.";
            };

            key = mkOption {
              type = types.path;
              example = "/etc/jobd/server.key";
              description = ''
                Server private key (PEM), passed as `-k`. Give a string path
                outside the Nix store (mode 0600): a Nix path literal or a
                store path is world-readable.
              '';
            };

            certificateAuthority = mkOption {
              type = types.path;
              example = "/etc/jobd/ca.pem";
              description = "CA certificate that client certificates must chain to, passed as `-C`.";
            };

            crl = mkOption {
              type = types.nullOr types.path;
              default = null;
              example = "/etc/jobd/crl.pem";
              description = ''
                Certificate revocation list (PEM), passed as `--crl`.
                `systemctl reload jobd` makes jobd read it again.
              '';
            };

            address = mkOption {
              type = types.str;
              default = "::";
              example = "::1";
              description = "Address to listen on (`-a`): an IPv4 or IPv6 literal or a host name.";
            };

            port = mkOption {
              type = types.port;
              default = 8000;
              description = "TCP port to listen on (`-p`).";
            };

            stateDirectory = mkOption {
              type = types.strMatching "/.+";
              default = "/var/lib/jobd";
              description = ''
                Where job records and output live (`--state-dir`). Below
                /var/lib, systemd's StateDirectory= creates it; elsewhere a
                tmpfiles rule does. Mode 0700 either way.
              '';
            };

            retain = mkOption {
              type = types.nullOr types.str;
              default = null;
              example = "30d";
              description = ''
                Remove finished jobs (record and output) this long after they
                ended, passed as `--retain`; null keeps them until deleted.
                A CI runner or a cron-heavy host wants one, e.g. "30d".
              '';
            };

            retainCount = mkOption {
              type = types.nullOr types.ints.unsigned;
              default = null;
              example = 100000;
              description = "Keep at most this many finished jobs, passed as `--retain-count`.";
            };

            maxLogSpace = mkOption {
              type = types.nullOr types.str;
              default = null;
              example = "20G";
              description = ''
                Keep at most this much output of finished jobs, the oldest
                removed first, passed as `--max-log-space`; e.g. a fifth of the
                state directory's file system.
              '';
            };

            maxLogSpacePerUser = mkOption {
              type = types.nullOr types.str;
              default = null;
              example = "5G";
              description = ''
                An owner's jobs' output may take at most this much, passed as
                `--max-log-space-per-user`; output beyond it is dropped and
                counted in `dropped_bytes`.
              '';
            };

            extraArgs = mkOption {
              type = types.listOf types.str;
              default = [ ];
              example = [
                "--log-format"
                "json"
                "--stop-grace"
                "5"
              ];
              description = "Further command-line arguments for jobd (see `jobd --help`).";
            };

            openFirewall = mkOption {
              type = types.bool;
              default = false;
              description = "Open {option}`services.jobd.port` in the firewall.";
            };
          };

          config = lib.mkIf cfg.enable {
            warnings = lib.optional (inStore cfg.key) ''
              services.jobd.key (${toString cfg.key}) is, or will be copied to,
              the world-readable Nix store, and jobd refuses to start with a key
              others can read. Use a string path such as "/etc/jobd/server.key"
              to a file of mode 0600.
            '';

            environment.systemPackages = [ cfg.package ];

            networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall [ cfg.port ];

            systemd.tmpfiles.rules = lib.mkIf (!underVarLib) [
              "d ${cfg.stateDirectory} 0700 root root - -"
            ];

            # Mirrors contrib/jobd.service, whose comments explain each
            # choice, and why the usual sandboxing options are absent: every
            # job inherits jobd's environment, so confining jobd would
            # confine the jobs it exists to run.
            systemd.services.jobd = {
              description = "jobd remote job runner";
              wantedBy = [ "multi-user.target" ];
              after = [ "network.target" ];
              # Jobs see the system profile and the setuid wrappers, as a
              # root login shell would; systemd's default PATH on NixOS has
              # little more than coreutils.
              path = [
                "/run/wrappers"
                "/run/current-system/sw"
              ];
              serviceConfig = {
                Type = "notify";
                NotifyAccess = "main";
                ExecStart = utils.escapeSystemdExecArgs (
                  [
                    (lib.getExe' cfg.package "jobd")
                    "-c"
                    cfg.certificate
                    "-k"
                    cfg.key
                    "-C"
                    cfg.certificateAuthority
                    "-a"
                    cfg.address
                    "-p"
                    cfg.port
                    "--state-dir"
                    cfg.stateDirectory
                  ]
                  ++ lib.optionals (cfg.crl != null) [
                    "--crl"
                    cfg.crl
                  ]
                  ++ lib.optionals (cfg.retain != null) [
                    "--retain"
                    cfg.retain
                  ]
                  ++ lib.optionals (cfg.retainCount != null) [
                    "--retain-count"
                    (toString cfg.retainCount)
                  ]
                  ++ lib.optionals (cfg.maxLogSpace != null) [
                    "--max-log-space"
                    cfg.maxLogSpace
                  ]
                  ++ lib.optionals (cfg.maxLogSpacePerUser != null) [
                    "--max-log-space-per-user"
                    cfg.maxLogSpacePerUser
                  ]
                  ++ cfg.extraArgs
                );
                ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
                StateDirectory = lib.mkIf underVarLib (lib.removePrefix "/var/lib/" cfg.stateDirectory);
                StateDirectoryMode = "0700";
                KillMode = "mixed";
                TimeoutStopSec = "30s";
                Delegate = true;
                OOMPolicy = "continue";
                LimitNOFILE = 65536;
                Restart = "on-failure";
                RestartSec = "2s";
                WatchdogSec = "30s";
              };
            };
          };
        };

      checks = forAllSystems (
        system: pkgs:
        let
          pki = testPki pkgs;
          jobd = self.packages.${system}.default;
        in
        {
          package = jobd;

          # Two machines: the server runs services.jobd; the client drives it
          # with jobctl across the test network.
          vm = pkgs.testers.runNixOSTest {
            name = "jobd";

            nodes.server = {
              imports = [ self.nixosModules.default ];
              services.jobd = {
                enable = true;
                package = jobd;
                certificate = "${pki}/server.pem";
                key = "/etc/jobd/server.key";
                certificateAuthority = "${pki}/ca.pem";
                openFirewall = true;
              };
              # Copied out of the store with its mode, as an operator would.
              environment.etc."jobd/server.key" = {
                source = "${pki}/server.key";
                mode = "0600";
              };
            };

            nodes.client = {
              environment.systemPackages = [ jobd ];
              environment.etc = {
                "jobctl/ca.pem".source = "${pki}/ca.pem";
                "jobctl/alice.pem".source = "${pki}/alice.pem";
                "jobctl/alice.key" = {
                  source = "${pki}/alice.key";
                  mode = "0600";
                };
                "jobctl/olga.pem".source = "${pki}/olga.pem";
                "jobctl/olga.key" = {
                  source = "${pki}/olga.key";
                  mode = "0600";
                };
              };
            };

            testScript = ''
              def jobctl(who, args):
                  # The server certificate names localhost, 127.0.0.1 and ::1,
                  # not "server": --server-name says which name to verify.
                  return (
                      f"jobctl -c /etc/jobctl/{who}.pem -k /etc/jobctl/{who}.key"
                      " -C /etc/jobctl/ca.pem -a server -p 8000 --server-name localhost "
                      + args
                  )

              def run(who, args):
                  return client.succeed(jobctl(who, args)).strip()

              start_all()
              # Type=notify: the unit is active only once jobd sent READY=1.
              server.wait_for_unit("jobd.service")
              client.wait_for_unit("multi-user.target")

              with subtest("a control client starts a job and streams it live"):
                  first = run("alice", "start /bin/sh -c 'echo hello; echo oops >&2; sleep 1; echo bye'")
                  assert first.isdigit(), first
                  out = client.succeed(jobctl("alice", f"stream {first}") + " 2>/tmp/stream.err")
                  assert out == "hello\nbye\n", repr(out)
                  err = client.succeed("cat /tmp/stream.err")
                  assert err == "oops\n", repr(err)
                  assert run("alice", f"status {first}") == "exited: 0"

              with subtest("stop ends the job and every process of it"):
                  job = run("alice", "start sleep 1000")
                  assert run("alice", f"status {job}") == "running"
                  assert run("alice", f"stop {job}") == "process stopped"
                  assert run("alice", f"status {job}") == "stopped"
                  server.fail("pgrep -x sleep")

              with subtest("an observe client is refused start, but sees every job"):
                  status, out = client.execute(jobctl("olga", "start true") + " 2>&1")
                  assert status == 1, (status, out)
                  assert "permission denied" in out, out
                  assert run("olga", f"status {first}") == "exited: 0"

              with subtest("systemctl reload keeps serving"):
                  server.succeed("systemctl reload jobd.service")
                  server.succeed("systemctl is-active jobd.service")
                  assert run("alice", f"status {first}") == "exited: 0"

              with subtest("a clean stop ends running jobs; records survive a restart"):
                  job = run("alice", "start sleep 1000")
                  server.succeed("systemctl stop jobd.service")
                  # jobd itself exited 0 within TimeoutStopSec (SPEC 5.5).
                  result = server.succeed("systemctl show -P Result jobd.service").strip()
                  assert result == "success", result
                  server.fail("pgrep -x sleep")
                  server.succeed("systemctl start jobd.service")
                  server.wait_for_unit("jobd.service")
                  assert run("alice", f"status {first}") == "exited: 0"
                  # Stopped by jobd's stop sequence, not lost by an unclean death.
                  assert run("alice", f"status {job}") == "stopped"
            '';
          };
        }
      );
    };
}
