{ pkgs, lib, config, ... }:

{
  cachix.enable = false;
  dotenv.enable = true;

  packages = with pkgs; [
    git
    jq
    nodePackages.pnpm
    config.extraPackage
  ] ++ lib.optionals pkgs.stdenv.isLinux [ inotify-tools ] ++ [ pkgs.curl ];

  languages.python = {
    enable = true;
    venv.enable = true;
  };

  services.postgres.enable = lib.mkIf config.withDatabase true;
  services.postgres.port = 5432;

  pre-commit.hooks.shellcheck.enable = true;
}
