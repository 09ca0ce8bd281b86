{ pkgs, lib, config, inputs, ... }:

let
  dbName = "shop";
  pgPort = 5433;
in
{
  # https://devenv.sh/basics/
  env.GREET = "devenv";
  env.DATABASE_NAME = dbName;

  packages = [ pkgs.git pkgs.nodejs_20 pkgs.python3Packages.pip ];

  languages.rust.enable = true;

  services.postgres = {
    enable = true;
    package = pkgs.postgresql_15;
    port = lib.mkDefault 5433;
    listen_addresses = "127.0.0.1";
    initialDatabases = [
      { name = "shop"; user = "shop"; pass = "s3cr3t"; }
      { name = dbName; }
    ];
    initialScript = ''
      CREATE ROLE admin SUPERUSER;
        -- indented two more
      CREATE EXTENSION IF NOT EXISTS pgcrypto;
    '';
  };

  processes.web.exec = "npm run dev";

  scripts.hello.exec = ''
    echo hello from $GREET
  '';

  enterShell = ''
    hello
    git --version
  '';
}
